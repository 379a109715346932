"""The CUDA paths against the CPU: a GPU must compute what the CPU computes.

vaelab draws every random number (permutation, binarization, noise) on the CPU from the run's
seed and moves it to the device, so a CUDA run sees the same data and noise as a CPU run, and the
two differ only by float rounding. These tests are skipped where no CUDA device is present (CI
has none); on a GPU machine, `pytest -m cuda` runs them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file

import vaelab
from vaelab.config import merge
from vaelab.data import load as load_data
from vaelab.evaluate import evaluate
from vaelab.models import build_model
from vaelab.runs import read_metrics
from vaelab.steps import FusedMLPStep, autograd_step
from vaelab.train import _autocast, compile_problem

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GPU = torch.device("cuda")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_step_on_cuda_equals_autograd_in_float64(compiled):
    """The seed's model (784-256-2, Keras' clipping): the fused float32 step on the GPU, eager and
    compiled, against autograd in float64 on the CPU, on the same weights, images and noise."""
    if compiled and (problem := compile_problem(GPU)):
        pytest.skip(problem)
    torch.manual_seed(0)
    reference = build_model(vaelab.preset("seed").model).double()
    model = build_model(vaelab.preset("seed").model)
    model.load_state_dict(reference.state_dict())
    model = model.to(GPU)
    x = torch.rand(100, 784, dtype=torch.float64)
    eps = torch.randn(100, 2, dtype=torch.float64)
    expected = autograd_step(reference, x, x, eps, 1.0, 1 / 100, contextlib.nullcontext)
    step = FusedMLPStep(model, compile=compiled)
    xg, eg = x.float().to(GPU), eps.float().to(GPU)
    for _ in range(2):  # a compiled step's second call runs the cached graph
        got = step(xg, xg, eg, 1.0, 1 / 100)
    for g, e in zip(got, expected, strict=True):
        assert g.device.type == GPU.type
        assert g.item() == pytest.approx(e.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert p.grad.device.type == GPU.type
        assert relative_error(p.grad, dict(reference.named_parameters())[name].grad) < 1e-4, name


def test_a_cuda_run_matches_the_cpu_run_and_loads_anywhere(tiny_npz, tmp_path):
    cpu = vaelab.train(small_config(tiny_npz, device="cpu"), tmp_path / "cpu")
    gpu = vaelab.train(small_config(tiny_npz, device="cuda"), tmp_path / "gpu")
    assert next(gpu.model.parameters()).device.type == GPU.type
    for a, b in zip(cpu.metrics, gpu.metrics, strict=True):
        for key in ("train_loss", "test_loss", "test_recon", "test_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    wc, wg = (
        load_file(tmp_path / "cpu" / "model.safetensors"),
        load_file(tmp_path / "gpu" / "model.safetensors"),
    )
    for k in wc:
        assert relative_error(wg[k], wc[k]) < 1e-3, k

    # weights written on the GPU load on the CPU, and on the GPU again, computing the same
    on_cpu, on_gpu = vaelab.load(tmp_path / "gpu"), vaelab.load(tmp_path / "gpu", device="cuda")
    assert next(on_cpu.parameters()).device.type == "cpu"
    x = torch.from_numpy(load_data(tiny_npz).x_test[:20].reshape(20, -1)).float() / 255
    mean_c, log_var_c = on_cpu.encode(x)
    mean_g, log_var_g = on_gpu.encode(x.to(GPU))
    torch.testing.assert_close(mean_g.cpu(), mean_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(log_var_g.cpu(), log_var_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        on_gpu.decode(mean_c.to(GPU)).cpu(), on_cpu.decode(mean_c), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(on_gpu.sample(8, seed=3).cpu(), on_cpu.sample(8, seed=3), rtol=1e-4, atol=1e-5)


def test_a_cuda_run_is_reproducible_and_resumes_bit_for_bit(tiny_npz, tmp_path):
    config = small_config(tiny_npz, device="cuda", epochs=3)
    vaelab.train(config, tmp_path / "a")
    vaelab.train(config, tmp_path / "b")
    vaelab.train(merge(config, {"train": {"epochs": 1}}, where="test"), tmp_path / "split")
    vaelab.train(config, tmp_path / "split", resume=True)
    rows = {d: read_metrics(tmp_path / d) for d in ("a", "b", "split")}
    assert without_seconds(rows["a"]) == without_seconds(rows["b"])
    assert [r["test_loss"] for r in rows["a"]] == [r["test_loss"] for r in rows["split"]]
    weights = {d: load_file(tmp_path / d / "model.safetensors") for d in ("a", "b", "split")}
    for k in weights["a"]:
        assert torch.equal(weights["a"][k], weights["b"][k]), k
        assert torch.equal(weights["a"][k], weights["split"][k]), k


def test_a_run_started_on_the_gpu_goes_on_on_the_cpu(tiny_npz, tmp_path):
    """A GPU run's checkpoint resumes on the CPU (--device may change on resume): the same run
    to float rounding, ending with its weights on the CPU."""
    gpu = vaelab.train(small_config(tiny_npz, device="cuda"), tmp_path / "gpu")
    vaelab.train(small_config(tiny_npz, device="cuda", epochs=1), tmp_path / "moved")
    moved = vaelab.train(small_config(tiny_npz, device="cpu"), tmp_path / "moved", resume=True)
    assert next(moved.model.parameters()).device.type == "cpu"
    for a, b in zip(gpu.metrics, moved.metrics, strict=True):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
    assert read_metrics(tmp_path / "moved")[-1]["epoch"] == 2


def test_bf16_autocast_on_cuda(tiny_npz, tmp_path):
    """bf16 computes the products in bfloat16 on the GPU, keeps float32 weights and losses, and
    trains to about the float32 run's loss."""
    autocast = _autocast("bf16", GPU)
    model = build_model(vaelab.preset("seed").model).to(GPU)
    with autocast():
        assert model.decode(torch.randn(4, 2, device=GPU)).dtype == torch.bfloat16
    x, eps = torch.rand(4, 784, device=GPU), torch.randn(4, 2, device=GPU)
    losses = autograd_step(model, x, x, eps, 1.0, 1 / 4, autocast)  # summed in float32
    assert all(t.dtype == torch.float32 for t in losses)

    fp32 = vaelab.train(small_config(tiny_npz, device="cuda", epochs=3), tmp_path / "fp32")
    bf16 = vaelab.train(small_config(tiny_npz, device="cuda", epochs=3, precision="bf16"), tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    losses = [r["test_loss"] for r in bf16.metrics]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert losses[-1] == pytest.approx(fp32.metrics[-1]["test_loss"], rel=0.02)
    assert losses != [r["test_loss"] for r in fp32.metrics]  # bf16 was not silently fp32


def test_evaluate_on_cuda_equals_the_cpu(tiny_npz, tmp_path):
    """The importance-weighted bound draws its noise on the CPU, image by image: the GPU gives the
    CPU's numbers to float rounding."""
    vaelab.train(small_config(tiny_npz, device="cpu", epochs=1), tmp_path / "run")
    images = load_data(tiny_npz).x_test
    on_cpu = evaluate(vaelab.load(tmp_path / "run"), images, k=200, limit=64)
    on_gpu = evaluate(vaelab.load(tmp_path / "run", device="cuda"), images, k=200, limit=64)
    for key in ("nll", "elbo", "recon", "kl"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], abs=1e-3), key


def test_torchrun_on_cuda_uses_nccl_and_matches_one_process(tiny_npz, tmp_path):
    """One torchrun process per GPU (nccl); with the GPUs present here, against a plain process."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    gpus = torch.cuda.device_count()
    common = ["train", "--data", str(tiny_npz), "--epochs", "2", "--batch-size", "50", "--hidden", "64"]
    common += ["--device", "cuda", "--no-figures"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(cmd):
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return out

    run([sys.executable, "-m", "vaelab", *common, "--out", "one"])
    many = run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            str(gpus),
            "-m",
            "vaelab",
            *common,
            "--out",
            "ddp",
        ]
    )
    assert "backend nccl, cuda:0" in many.stdout, many.stdout[-2000:]
    one, ddp = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ddp")
    for a, b in zip(one, ddp, strict=True):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
