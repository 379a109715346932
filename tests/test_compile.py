"""`--compile`: torch.compile of the training step and of the RMSprop update.

The compiled step must compute what the eager one computes (to float32 rounding: Inductor fuses
and reorders elementwise work), also when the learning rate, the KL weight, the clip or RMSprop's
alpha change between calls (torch 2.13 can keep a stale number in a compiled graph), must not
recompile for each new rate or KL weight, and a compiled run must be reproducible. Each test
compiles (seconds each; about 100 s in all with an empty Inductor cache), so the models are
tiny. Where no C++ compiler is present the tests that compile are skipped, with the reason;
test.sh installs g++ where it can.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo

import vaelab
from vaelab.cli import main
from vaelab.config import ModelConfig, merge
from vaelab.models import build_model
from vaelab.optim import RMSprop
from vaelab.steps import FusedMLPStep, autograd_step, make_step
from vaelab.train import compile_problem


def _have_compiler() -> bool:
    return "C++ compiler" not in (compile_problem(torch.device("cpu")) or "")


needs_compiler = pytest.mark.skipif(
    compile_problem(torch.device("cpu")) is not None,
    reason=f"{compile_problem(torch.device('cpu'))} (test.sh installs g++ where it can)",
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty compile caches (and recompile budgets) and graph counts."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    """Graphs torch.compile has built so far: proof that a compiled path ran, not eager."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(**{"hidden": [32], "latent_dim": 3, "bernoulli_clip": 1e-7, **kw})
    return build_model(config)


def _batch(b: int = 16, d: int = 784, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, d, generator=g), torch.randn(b, 3, generator=g)


@needs_compiler
def test_compiled_fused_step_and_rmsprop_match_eager_without_recompiling():
    """Five steps with a new learning rate and KL weight each: the same losses and weights as
    the eager step and optimizer. The first new value recompiles once, with the number as an
    input (Dynamo's automatic dynamic); from then on a schedule never recompiles (raises here)."""
    runs = {}
    for compiled in (False, True):
        model = _model()
        step = FusedMLPStep(model, compile=compiled)
        optimizer = RMSprop([step.flat], compile=compiled)
        start = step.flat.detach().clone()
        losses = []
        for i in range(5):
            with torch._dynamo.config.patch(error_on_recompile=i >= 2):
                x, eps = _batch(seed=i)
                optimizer.param_groups[0]["lr"] = 1e-3 * 0.5**i
                losses.append(torch.stack(step(x, x, eps, beta=0.3 + 0.2 * i, scale=1 / 16)))
                optimizer.step()
        assert (step.flat != start).float().mean() > 0.9  # the updates reached the model's weights
        assert (_graphs() > 0) == compiled
        runs[compiled] = (torch.stack(losses), step.flat.detach().clone(), step.flat.grad.clone())
    (l0, w0, g0), (l1, w1, g1) = runs[False], runs[True]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_compiled_steps_with_other_settings_in_one_process_match_eager():
    """The compiled code is shared by every step and optimizer of a process: a second and third
    run in it (another clip, another RMSprop alpha: a sweep) must use their own numbers, not
    the first run's. Large decoder weights put many logits beyond each clip."""
    results = {}
    for clip, alpha in ((1e-7, 0.9), (1e-3, 0.8), (1e-2, 0.5)):
        for compiled in (False, True):
            model = _model(bernoulli_clip=clip)
            with torch.no_grad():
                model.decoder.out.weight.mul_(30)
            step = FusedMLPStep(model, compile=compiled)
            optimizer = RMSprop([step.flat], alpha=alpha, compile=compiled)
            losses = []
            for i in range(2):
                x, eps = _batch(seed=i)
                losses.append(torch.stack(step(x, x, eps, beta=1.0, scale=1 / 16)))
                optimizer.step()
            results[clip, compiled] = (torch.stack(losses), step.flat.detach().clone())
    for clip in (1e-7, 1e-3, 1e-2):
        (l0, w0), (l1, w1) = results[clip, False], results[clip, True]
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-3)
        # (a stale alpha or clip moves weights by ~1e-3: RMSprop's first steps are lr / sqrt(1 - alpha))
        torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-5)
    # the clips matter here: each gives another loss
    first = [results[clip, False][0][0, 0].item() for clip in (1e-7, 1e-3, 1e-2)]
    assert len({round(v, 1) for v in first}) == 3, first
    assert _graphs() > 0


@needs_compiler
@pytest.mark.parametrize("objective, k", [("iwae", 4), ("elbo", 2)])
def test_compiled_autograd_step_matches_eager(objective, k):
    """Models the fused step does not cover compile `model.losses`; autograd runs through it.
    In float64, so that the comparison is of the mathematics, not of float32 summation order;
    the KL weight changes from call to call (a warm-up), as the learning rate does above."""
    x, _ = _batch()
    x = x.double()
    eps = torch.randn(k, 16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    betas = [1.0] if objective == "iwae" else [0.2, 0.5, 0.9, 1.0]
    grads = {}
    for compiled in (False, True):
        model = _model().double()
        step = make_step(model, "fp32", objective=objective, k=k, compile=compiled)
        assert not isinstance(step, FusedMLPStep)
        grads[compiled] = []
        for beta in betas:
            loss = step(x, x, eps, beta, 1 / 16, contextlib.nullcontext)
            grads[compiled].append((torch.stack(loss), [p.grad.clone() for p in model.parameters()]))
        assert (_graphs() > 0) == compiled
    for (l1, g1), (l0, g0) in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-8)
        for a, b in zip(g1, g0, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_autograd_step_takes_the_losses_it_is_given():
    """The hook the compiled path uses: `losses` replaces `model.losses` (here a doubled one)."""
    model = _model()
    x, eps = _batch()

    def doubled(*args):
        return tuple(2 * t for t in model.losses(*args))

    off = contextlib.nullcontext
    once = autograd_step(model, x, x, eps, 1.0, 1.0, off)
    twice = autograd_step(model, x, x, eps, 1.0, 1.0, off, losses=doubled)
    torch.testing.assert_close(torch.stack(twice), 2 * torch.stack(once))


def _tiny_data(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (600, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 600),
        x_test=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 100),
    )
    return path


@needs_compiler
def test_compiled_training_is_reproducible_and_close_to_eager(tmp_path):
    data = _tiny_data(tmp_path / "data.npz")
    rows = {}
    for name, compiled in (("c1", True), ("c2", True), ("eager", False)):
        config = merge(
            vaelab.preset("seed"),
            {
                "data": {"source": str(data)},
                "model": {"hidden": [64]},
                "train": {"epochs": 2, "compile": compiled},
            },
            where="test",
        )
        vaelab.train(config, tmp_path / name)
        rows[name] = [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
    assert _graphs() > 0
    assert rows["c1"] == rows["c2"]  # the same seed, the same numbers
    assert json.loads((tmp_path / "c1" / "config.json").read_text())["train"]["compile"] is True
    for a, b in zip(rows["c1"], rows["eager"], strict=True):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-3)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    # --compile may be switched off (and on) when resuming; other settings may not
    run = str(tmp_path / "c1")
    assert main(["train", "--resume", run, "--epochs", "3", "--no-compile", "--no-figures"]) == 0
    assert len((tmp_path / "c1" / "metrics.jsonl").read_text().splitlines()) == 3
    assert main(["train", "--resume", run, "--epochs", "4", "--seed", "1", "--no-figures"]) == 2


def test_compile_without_a_cxx_compiler_is_refused_up_front(tmp_path):
    """One line naming the option, exit 2, no run directory, and before any data is read (MNIST
    with an empty cache would be fetched: nothing appears in $VAELAB_HOME)."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "VAELAB_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "vaelab", "train", "--compile", "--device", "cpu", "--out", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelab train: error: option --compile:"), done.stderr
    assert "C++ compiler" in lines[0]
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*"))


def test_have_compiler_agrees_with_path():
    """The skip condition above is not vacuous: on a machine with g++ the compiler is found."""
    if shutil.which(os.environ.get("CXX", "g++")):
        assert _have_compiler()


def test_rmsprop_keeps_its_update_through_deepcopy_and_pickle():
    """Optimizer's own __getstate__ keeps only defaults, state and groups; ours keeps the choice."""
    import copy
    import pickle

    for compiled in (False, True):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 0.5)
        optimizer = RMSprop([p], compile=compiled)
        for other in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
            assert other._compile is compiled
        if not compiled:  # steps (the compiled copy would compile: tested above)
            copy.deepcopy(optimizer).step()
