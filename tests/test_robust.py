"""Never lose a run: real processes killed at random points, signals, locks, NaN, full disks, pickles.

The trainers here are real `python -m vaelab train` processes on a small synthetic data set,
killed with SIGKILL at random moments and resumed with `vaelab train --resume RUN`; the final
weights must equal, bit for bit (`torch.equal`), those of an uninterrupted run with the same seed.
Child processes run with one thread (OMP_NUM_THREADS=1), like this test process (conftest), so
both compute the same float operations in the same order.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import permissions_as_for_a_user, synthetic_digits
from safetensors.torch import load_file

import vaelab
from vaelab import runs
from vaelab.cli import main
from vaelab.config import merge
from vaelab.train import NonFiniteLoss, TrainingInterrupted

SEED = 3


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2,000 training and 300 test synthetic 28x28 digits."""
    x_train, y_train = synthetic_digits(2000, seed=1)
    x_test, y_test = synthetic_digits(300, seed=2)
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def train_args(data: Path, epochs: int) -> list[str]:
    return ["--data", str(data), "--epochs", str(epochs), "--batch-size", "50", "--hidden", "32",
            "--latent-dim", "2", "--seed", str(SEED), "--no-figures"]


def child_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "VAELAB_HOME": str(tmp_path / "home")}


def spawn(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaelab", "train", *args], cwd=tmp_path,
                            env=child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> bool:
    """Poll `condition` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the trainer")


def lock_pid(run: Path) -> int | None:
    try:
        return json.loads((run / runs.LOCK).read_text()).get("pid")
    except (OSError, ValueError):
        return None


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / runs.WEIGHTS), load_file(b / runs.WEIGHTS)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs from the uninterrupted run"


def same_metrics(a: Path, b: Path) -> None:
    def rows(run):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in runs.read_metrics(run)]

    assert rows(a) == rows(b)


def reference(data: Path, root: Path, epochs: int) -> tuple[Path, float]:
    """An uninterrupted run (in this process) and its mean seconds per epoch."""
    out = root / f"reference-{epochs}"
    assert main(["train", *train_args(data, epochs), "--out", str(out)]) == 0
    seconds = [r["seconds"] for r in runs.read_metrics(out)]
    return out, sum(seconds) / len(seconds)


EPOCHS = 8  # room for the random kill points, whatever the machine's speed


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> tuple[Path, float]:
    return reference(data, tmp_path_factory.mktemp("reference"), EPOCHS)


# --- (a) SIGKILL at random points, then --resume ------------------------------------------


def kill_and_resume(data: Path, tmp_path: Path, epochs: int, kills: int, epoch_seconds: float,
                    rng: random.Random) -> tuple[Path, list[str]]:
    """Train, SIGKILL at `kills` random moments, resuming after each but the last.

    The first process is killed after its starting checkpoint exists (see also
    test_a_run_killed_before_its_first_checkpoint_can_be_resumed), every resumed one once it
    holds the run's lock, each after a random delay of up to 1.5 epochs: inside a step, between
    steps, during the test pass or while files are written.
    Returns the run directory (last killed, not yet resumed) and a description of each kill.
    """
    run = tmp_path / "run"
    proc = spawn([*train_args(data, epochs), "--out", str(run)], tmp_path)
    started = lambda: (run / runs.CHECKPOINT).exists()  # noqa: E731
    since = "after its first checkpoint"
    points: list[str] = []
    while True:
        assert wait_for(started, proc), proc.communicate()
        delay = rng.uniform(0, 1.5 * epoch_seconds)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended after {len(points)} kills (too few epochs): {points}"
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
        state = runs.read_checkpoint(run)  # after every kill the checkpoint is whole and loadable
        litter = len(list(run.rglob("*.tmp")))
        points.append(f"kill {len(points) + 1}: {delay:.3f}s {since}; resumes at epoch "
                      f"{state['epoch']}, step {state['step']}; {litter} temporary file(s) left")
        if len(points) == kills:
            return run, points
        proc = spawn(["--resume", str(run), "--no-figures"], tmp_path)
        started = lambda pid=proc.pid: lock_pid(run) == pid  # noqa: E731
        since = "after the resumed trainer took the lock"


def test_sigkill_at_random_points_then_resume_gives_identical_weights(data, reference_run, tmp_path):
    """Two random kill points (the fast variant); this process finishes the run."""
    ref, epoch_seconds = reference_run
    run, points = kill_and_resume(data, tmp_path, EPOCHS, 2, epoch_seconds, random.Random())
    assert main(["train", "--resume", str(run), "--no-figures"]) == 0
    print("\n".join(points))
    same_weights(run, ref)
    same_metrics(run, ref)
    assert not (run / runs.LOCK).exists()


@pytest.mark.slow
def test_sigkill_at_many_random_points_then_resume_gives_identical_weights(data, tmp_path):
    """Six random kill points; every trainer a real process, the last one finishing the run."""
    ref, epoch_seconds = reference(data, tmp_path / "ref", 20)
    run, points = kill_and_resume(data, tmp_path, 20, 6, epoch_seconds, random.Random())
    proc = spawn(["--resume", str(run), "--no-figures"], tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    print("\n".join(points))
    same_weights(run, ref)
    same_metrics(run, ref)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no handler, no checkpoint)."""


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed(data, tmp_path, monkeypatch):
    ref, _ = reference(data, tmp_path, 2)
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise _Killed

    with monkeypatch.context() as m:  # dies at the end of epoch 1, before its checkpoint
        m.setattr(sys.modules["vaelab.train"], "test_pass", killed)
        with pytest.raises(_Killed):
            main(["train", *train_args(data, 2), "--out", str(run)])
    assert not (run / runs.WEIGHTS).exists() and runs.read_metrics(run) == []
    assert runs.read_checkpoint(run)["epoch"] == 1  # the starting checkpoint
    assert main(["train", "--resume", str(run), "--no-figures"]) == 0
    same_weights(run, ref)
    same_weights(run, ref)


# --- (b) SIGINT and SIGTERM: checkpoint, advice, exit 130 / 143 ----------------------------


def interrupt(proc: subprocess.Popen, run: Path, signum: int, started, delay: float) -> str:
    assert wait_for(started, proc), proc.communicate()
    time.sleep(delay)
    assert proc.poll() is None, "the trainer ended before it could be interrupted"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vaelab train: interrupted at epoch") and "checkpoint written" in lines[0]
    assert f"vaelab train --resume {run}" in lines[0]
    state = runs.read_checkpoint(run)
    # mid-epoch (the signal's step), or at the next epoch's start if it came after a last step
    assert state["step"] > 0 or f"epoch {state['epoch']}, step 0/" in lines[0], (state["step"], lines[0])
    return lines[0]


def test_sigint_and_sigterm_write_a_checkpoint_and_resume_finishes_identically(
        data, reference_run, tmp_path):
    ref, epoch_seconds = reference_run
    rng = random.Random()
    run = tmp_path / "run"
    proc = spawn([*train_args(data, EPOCHS), "--out", str(run)], tmp_path)
    delay = rng.uniform(0, min(0.5 * epoch_seconds, 0.3))  # mid-run, well before the end
    interrupt(proc, run, signal.SIGINT, lambda: (run / runs.CHECKPOINT).exists(), delay)
    proc = spawn(["--resume", str(run), "--no-figures"], tmp_path)
    pid = proc.pid
    # a little after the lock: the signal handlers are installed right after it is taken
    delay = 0.02 + rng.uniform(0, min(0.5 * epoch_seconds, 0.3))
    interrupt(proc, run, signal.SIGTERM, lambda: lock_pid(run) == pid, delay)
    assert main(["train", "--resume", str(run), "--no-figures"]) == 0
    same_weights(run, ref)
    same_metrics(run, ref)


# --- (c) the lock --------------------------------------------------------------------------


def _hold_lock(run_dir: str, ready, release, die: bool) -> None:
    with runs.locked(run_dir):
        ready.set()
        if die:  # a crashed trainer: its lock stays behind
            os.kill(os.getpid(), signal.SIGKILL)
        release.wait(120)


@pytest.fixture
def one_epoch_run(data, tmp_path) -> Path:
    run = tmp_path / "run"
    assert main(["train", *train_args(data, 1), "--out", str(run)]) == 0
    return run


def _holder(run: Path, die: bool):
    context = multiprocessing.get_context("fork")  # a second process with the real lock code
    ready, release = context.Event(), context.Event()
    proc = context.Process(target=_hold_lock, args=(str(run), ready, release, die))
    proc.start()
    assert ready.wait(60)
    return proc, release


def test_a_second_trainer_is_refused_naming_the_live_holder(one_epoch_run, capsys):
    run = one_epoch_run
    holder, release = _holder(run, die=False)
    try:
        before = sorted(p.name for p in run.rglob("*"))
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--epochs", "2", "--no-figures"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        assert f"process {holder.pid}" in err and "held by a running trainer" in err
        assert sorted(p.name for p in run.rglob("*")) == before
        assert lock_pid(run) == holder.pid  # the holder's lock is left alone
    finally:
        release.set()
        holder.join(60)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-figures"]) == 0


def test_a_stale_lock_of_a_dead_process_is_taken_over(one_epoch_run):
    run = one_epoch_run
    holder, _ = _holder(run, die=True)
    holder.join(60)  # reaped: its pid is free
    assert holder.exitcode == -signal.SIGKILL and lock_pid(run) == holder.pid
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-figures"]) == 0
    assert not (run / runs.LOCK).exists()
    assert [r["epoch"] for r in runs.read_metrics(run)] == [1, 2]


def test_an_empty_lock_file_is_taken_over_but_not_a_file_vaelab_did_not_write(one_epoch_run, capsys):
    (one_epoch_run / runs.LOCK).write_text("garbage")  # not vaelab's: never deleted
    assert main(["train", "--resume", str(one_epoch_run), "--epochs", "2", "--no-figures"]) == 2
    assert "is not a lock vaelab wrote" in capsys.readouterr().err
    assert (one_epoch_run / runs.LOCK).read_text() == "garbage"
    (one_epoch_run / runs.LOCK).write_text("")  # a trainer killed between creating and writing it
    assert main(["train", "--resume", str(one_epoch_run), "--epochs", "2", "--no-figures"]) == 2
    assert "a trainer is starting in it" in capsys.readouterr().err  # (or one that is, right now)
    old = time.time() - runs.EMPTY_LOCK_SECONDS - 1
    os.utime(one_epoch_run / runs.LOCK, (old, old))
    assert main(["train", "--resume", str(one_epoch_run), "--epochs", "2", "--no-figures"]) == 0
    assert not (one_epoch_run / runs.LOCK).exists()


# --- (d) NaN -------------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_with_epoch_and_advice(data, tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    code = main(["train", *train_args(data, 3), "--lr", "1e6", "--out", str(run)])
    err = capsys.readouterr().err
    assert code != 0 and code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "NaN or infinite" in err and "epoch 1" in err
    assert "lower --lr" in err and "1e+06" in err
    assert "--precision" not in err and "--beta" not in err  # the run is fp32 already, beta 1


def test_a_huge_kl_weight_stops_with_advice_that_names_it(data, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", *train_args(data, 3), "--beta", "1e300", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "NaN or infinite" in err and "--beta (now 1e+300)" in err, err


def test_the_nan_message_names_the_step(data, tmp_path, capsys):
    capsys.readouterr()
    main(["train", *train_args(data, 3), "--lr", "1e6", "--out", str(tmp_path / "run")])
    assert "step " in capsys.readouterr().err


def test_nan_keeps_the_last_good_checkpoint_and_resume_continues(data, tmp_path):
    """Weights turned NaN after epoch 2: epoch 3 stops; epoch 2's checkpoint and weights stay good."""
    epochs = 3
    config = merge(vaelab.preset("seed"), {
        "data": {"source": str(data)}, "model": {"hidden": [32], "latent_dim": 2},
        "train": {"epochs": epochs, "batch_size": 50, "seed": SEED},
    }, where="test")
    ref = tmp_path / "ref"
    vaelab.train(config, ref)

    def poison(model, row):
        if row["epoch"] == 2:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")

    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="epoch 3") as caught:
        vaelab.train(config, run, on_epoch_end=poison)
    assert "--lr" in str(caught.value) and "\n" not in str(caught.value)
    state = runs.read_checkpoint(run)
    assert (state["epoch"], state["step"]) == (3, 0)  # the checkpoint written after epoch 2
    model = vaelab.load(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key])
    assert not (run / runs.LOCK).exists()
    # the kept checkpoint is a good one: resuming from it ends where the clean run ended
    assert main(["train", "--resume", str(run), "--no-figures"]) == 0
    same_weights(run, ref)


# --- (e) unwritable output and full disks ---------------------------------------------------


def test_out_inside_a_file_is_refused_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    capsys.readouterr()
    # the data does not exist either: the --out message proves --out is checked first
    assert main(["train", "--data", "missing.npz", "--out", "notes.txt/run"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("cannot create notes.txt/run: notes.txt is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_in_a_read_only_folder_is_refused_before_training(data, tmp_path, capsys, monkeypatch):
    permissions_as_for_a_user(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", *train_args(data, 1), "--out", str(locked / "run")]) == 2
        assert "no permission to write" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    """ENOSPC on epoch 2's checkpoint: one line, exit 2, epoch 1's checkpoint whole, no temp files."""
    real_fsync, checkpoints = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "/checkpoint/.state.pt." in name:
            checkpoints.append(name)
            if len(checkpoints) == 3:  # the starting one, epoch 1's, then epoch 2's fails
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *train_args(data, 3), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "checkpoint/state.pt: cannot be written (No space left on device)" in err
    assert "previous version is kept" in err
    monkeypatch.setattr(os, "fsync", real_fsync)
    state = runs.read_checkpoint(run)
    assert (state["epoch"], state["step"]) == (2, 0)  # epoch 1's checkpoint, whole
    assert list(run.rglob("*.tmp")) == []
    assert not (run / runs.LOCK).exists()


# --- (f) no pickle is ever loaded from a user -----------------------------------------------


def _malicious(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (open, ("PWNED", "w"))  # stands for any code

    torch.save({"model": Payload(), "optimizer": {}, "rng": None, "epoch": 1, "step": 0}, path)


def test_a_malicious_checkpoint_is_refused_and_never_runs(one_epoch_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _malicious(one_epoch_run / runs.CHECKPOINT)
    capsys.readouterr()
    assert main(["train", "--resume", str(one_epoch_run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "checkpoint/state.pt: not a readable checkpoint (refused by the safe loader" in err
    with pytest.raises(vaelab.RunError, match="refused by the safe loader"):
        runs.read_checkpoint(one_epoch_run)
    assert not (tmp_path / "PWNED").exists()


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *train_args(data, 1), "--out", str(run)]) == 0
    return run


def _edit_checkpoint(change):
    def edit(run: Path) -> None:
        path = run / runs.CHECKPOINT
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)

    return edit


def _other_model_weights(state) -> None:
    from vaelab.models import build_model

    state["model"] = build_model(vaelab.preset("seed").model).state_dict()  # 256 hidden, not 32


def _edit_first_metrics_row(change):
    def edit(run: Path) -> None:
        rows = runs.read_metrics(run)
        change(rows[0])
        (run / runs.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))

    return edit


def _write_metrics(data: bytes):
    return lambda run: (run / runs.METRICS).write_bytes(data)


def test_a_checkpoint_written_after_an_epochs_last_step_resumes(finished_run, tmp_path):
    """A signal during an epoch's last step saves step == steps (nothing left but the epoch's end):
    a valid checkpoint, not a damaged one."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    steps = 2000 // 50
    _edit_checkpoint(lambda s: s.update(epoch=1, step=steps))(run)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert [r["epoch"] for r in runs.read_metrics(run)] == [1, 2]


def test_new_runs_go_into_empty_folders_but_old_runs_still_open(data, tmp_path):
    """The Python API: hidden files do not make a folder taken, other files do (the message names
    no command-line option); a run made before a newer check (iwae with a warm-up) still loads."""
    config = merge(vaelab.preset("seed"), {"data": {"source": str(data)}, "model": {"hidden": [16]},
                                           "train": {"epochs": 1, "batch_size": 50}}, where="test")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".gitkeep").write_text("")
    vaelab.train(config, hidden)
    assert (hidden / ".gitkeep").exists() and (hidden / "config.json").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "d.npz").write_bytes(data.read_bytes())
    with pytest.raises(vaelab.RunError, match=r"^\S*taken already holds files that are not a run \(d.npz\)"):
        vaelab.train(config, taken)
    iwae_warmup = merge(config, {"train": {"objective": "iwae", "k": 2, "warmup_epochs": 2.0}}, where="test")
    with pytest.raises(vaelab.ConfigError, match="iwae objective has no KL weight to warm up"):
        vaelab.train(iwae_warmup, tmp_path / "new")  # refused for a new run ...
    assert not (tmp_path / "new").exists()
    (hidden / "config.json").write_text(iwae_warmup.to_json())  # ... but a run made before the check
    assert vaelab.load(hidden).sample(2, seed=0).shape == (2, 784)  # still opens


DAMAGED = {  # what is changed in a finished 1-epoch run, and words the refusal must hold
    "epoch-negative": (_edit_checkpoint(lambda s: s.update(epoch=-5)), "its epoch is -5"),
    "step-past-the-epoch": (_edit_checkpoint(lambda s: s.update(step=41)), "its step is 41, but an epoch"),
    "epoch-text": (_edit_checkpoint(lambda s: s.update(epoch="2")), "its epoch is '2'"),
    "epoch-ahead-of-metrics": (_edit_checkpoint(lambda s: s.update(epoch=5)), "one row for each of"),
    "partial-missing": (_edit_checkpoint(lambda s: s.update(partial=None)), "partial epoch sums"),
    "rng-damaged": (_edit_checkpoint(lambda s: s.update(rng=torch.zeros(3, dtype=torch.uint8))), "random"),
    "optimizer-empty": (_edit_checkpoint(lambda s: s.update(optimizer={"state": {}, "param_groups": []})),
                        "optimizer state does not fit"),
    "weights-of-another-model": (_edit_checkpoint(_other_model_weights), "weights do not fit the model"),
    "metrics-a-list": (_write_metrics(b"[1]\n"), "line 1 is not a row of metrics"),
    "metrics-not-text": (_write_metrics(b"\xff\n"), "not text"),
    "metrics-seconds-text": (_edit_first_metrics_row(lambda r: r.update(seconds="x")), "'seconds' is 'x'"),
    "metrics-no-train-loss": (_edit_first_metrics_row(lambda r: r.pop("train_loss")), "has no 'train_loss'"),
}


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_checkpoint_or_metrics_is_refused_and_the_run_kept(finished_run, tmp_path, capsys, case):
    """--resume of a run whose files were damaged or edited: one line, exit 2, not a byte changed
    (a checkpoint edited to epoch -5 once rewrote metrics.jsonl from epoch -5 on)."""
    damage, words = DAMAGED[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "10"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_load_reads_weights_only_from_safetensors(one_epoch_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _malicious(one_epoch_run / runs.CHECKPOINT)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("vaelab.load must not call torch.load")

    monkeypatch.setattr(torch, "load", no_torch_load)
    model = vaelab.load(one_epoch_run)  # the checkpoint is not even opened
    assert model.sample(2, seed=0).shape == (2, 784)
    _malicious(one_epoch_run / runs.WEIGHTS)  # a pickle where the safetensors file should be
    with pytest.raises(vaelab.RunError, match="not a readable safetensors file"):
        vaelab.load(one_epoch_run)
    assert not (tmp_path / "PWNED").exists()


def test_a_signal_after_an_epochs_last_step_stops_at_the_epoch_boundary(data, tmp_path):
    """SIGINT during the test pass or the epoch's writes: stop there, resume identically."""
    config = merge(vaelab.preset("seed"), {
        "data": {"source": str(data)}, "model": {"hidden": [32], "latent_dim": 2},
        "train": {"epochs": 3, "batch_size": 50, "seed": SEED},
    }, where="test")
    ref, run = tmp_path / "ref", tmp_path / "run"
    vaelab.train(config, ref)

    def interrupt_after_epoch_1(model, row):
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # lands after the last step of epoch 1

    with pytest.raises(TrainingInterrupted) as stopped:
        vaelab.train(config, run, on_epoch_end=interrupt_after_epoch_1)
    assert stopped.value.exit_code == 130
    assert "interrupted at epoch 2, step 0/" in str(stopped.value)
    state = runs.read_checkpoint(run)
    assert (state["epoch"], state["step"]) == (2, 0)
    vaelab.train(config, run, resume=True)
    same_weights(run, ref)
    same_metrics(run, ref)


def test_out_of_memory_is_one_line_and_takes_the_new_run_away(data, tmp_path, monkeypatch, capsys):
    """An allocation that fails in the first epoch (here: made to fail) ends with one line and exit
    2, and the run it had just begun is gone, not left half made."""
    train_module = sys.modules["vaelab.train"]  # (vaelab.train is also the function)

    def step_that_runs_out(*args, **kwargs):
        def step(*a, **k):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                               "allocate memory: you tried to allocate 800000000000 bytes. Error code 12")
        return step

    monkeypatch.setattr(train_module, "make_step", step_that_runs_out)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *train_args(data, 1), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["vaelab train: error: out of memory (an array of 745.1 GiB was asked for); "
                                "ask for less: a smaller --batch-size, --hidden or --k"]
    assert not run.exists()
    run.mkdir()  # a folder of the user's stays, with what it held
    (run / ".gitkeep").write_text("mine\n")
    assert main(["train", *train_args(data, 1), "--out", str(run)]) == 2
    assert run.is_dir() and [p.name for p in run.iterdir()] == [".gitkeep"]
    assert (run / ".gitkeep").read_text() == "mine\n"


def test_the_size_an_allocation_asked_for_reads_the_same_from_every_allocator():
    from vaelab.cli import _allocation, out_of_memory

    cuda = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total capacity)")
    assert out_of_memory(cuda) and _allocation(cuda) == "an array of 20.0 GiB was asked for"
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1048576 bytes.")
    assert out_of_memory(cpu) and _allocation(cpu) == "an array of 1.0 MiB was asked for"
    assert out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_load_refuses_weights_that_are_not_finite_floats_and_unknown_devices(finished_run, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(vaelab.RunError, match="'gpu7' is not a device"):
        vaelab.load(finished_run, device="gpu7")
    if torch.cuda.is_available():  # one index past the visible devices
        visible = torch.cuda.device_count()
        with pytest.raises(vaelab.RunError, match=f"cuda:{visible} was asked for but {visible} CUDA devices"):
            vaelab.load(finished_run, device=f"cuda:{visible}")
    if not torch.backends.mps.is_available():
        with pytest.raises(vaelab.RunError, match="mps was asked for but MPS is not available"):
            vaelab.load(finished_run, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(vaelab.RunError, match="no CUDA device"):
            vaelab.load(finished_run, device="cuda")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = load_file(run / runs.WEIGHTS)
    save_file({**state, "decoder.out.bias": state["decoder.out.bias"].long()}, run / runs.WEIGHTS)
    with pytest.raises(vaelab.RunError, match="decoder.out.bias holds int64 values, not floating-point"):
        vaelab.load(run)
    save_file({**state, "encoder.z_mean.weight": state["encoder.z_mean.weight"] / 0}, run / runs.WEIGHTS)
    with pytest.raises(vaelab.RunError, match="encoder.z_mean.weight holds NaN or infinite values"):
        vaelab.load(run)


def test_labels_a_conditional_model_does_not_know_are_refused(tmp_path, capsys):
    """Training: labels up to 2**31 - 1 would make a 2-billion-row label table; evaluate and
    --resume: test labels beyond the model's classes (the data changed under the run)."""
    x, y = synthetic_digits(300, seed=1)
    huge = np.where(np.arange(200) == 0, 2**31 - 1, y[:200])
    np.savez(tmp_path / "huge.npz", x_train=x[:200], y_train=huge, x_test=x[200:], y_test=y[200:])
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "huge.npz"), "--conditional", "--epochs", "1",
                 "--hidden", "16", "--out", str(tmp_path / "a")]) == 2
    assert "labels of" in capsys.readouterr().err and not (tmp_path / "a").exists()

    np.savez(tmp_path / "d.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    run = tmp_path / "cv"
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--conditional", "--epochs", "1",
                 "--batch-size", "50", "--hidden", "16", "--out", str(run)]) == 0
    classes = vaelab.load(run).config.num_classes
    np.savez(tmp_path / "d.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:] + classes)
    capsys.readouterr()
    assert main(["evaluate", str(run), "-k", "2", "--limit", "10"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"knows {classes} classes" in err
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"knows {classes} classes" in err and "did the data change" in err


def test_resume_on_changed_data_is_refused(tmp_path, capsys):
    """The checkpoint keeps a digest of the data: a run whose data file was replaced since does not
    go on, silently, on other images."""
    x, y = synthetic_digits(300, seed=1)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    run = tmp_path / "run"
    assert main(["train", *train_args(data, 1), "--out", str(run)]) == 0
    np.savez(data, x_train=x[100:300], y_train=y[100:300], x_test=x[:100], y_test=y[:100])
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not the data" in err and "resume needs the same data" in err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    np.savez(data, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])  # the same again
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
