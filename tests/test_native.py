"""The fused step's native code (vaelab/native/step.c) against float64 mathematics and autograd,
and its fallback: a missing or failing compiler leaves the PyTorch path, with one line saying so."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab import native
from vaelab.config import ModelConfig
from vaelab.models import build_model
from vaelab.native.mlp import NativeMLPStep
from vaelab.steps import FusedMLPStep, autograd_step

ptr = torch.Tensor.data_ptr


def library():
    """The native library; skipped only where it is not wanted or there is no compiler at all."""
    lib = native.library()
    if lib is None:
        if os.environ.get("VAELAB_NATIVE") == "0" or shutil.which(os.environ.get("CC") or "cc") is None:
            pytest.skip(f"vaelab.native: {native.reason()}")
        pytest.fail(f"a C compiler is here but the native library is not: {native.reason()}")
    return lib


@pytest.mark.parametrize(
    "activation, hidden, latent, epsilon_std, beta, clip",
    [
        ("relu", (32,), 2, 1.0, 1.0, 1e-7),  # the seed's shape of model, Keras' clipping
        ("tanh", (24, 16), 3, 0.5, 0.3, 0.0),
        ("elu", (16, 8), 1, 1.0, 2.0, 0.01),  # many logits beyond the clip
        ("relu", (40,), 32, 1.0, 1.0, 0.0),
        ("relu", (70, 24), 2, 1.0, 1.0, 1e-7),  # 70 = 64 + 6: sparse_product's tiers
    ],
)
@pytest.mark.parametrize("zeros", [False, True])
def test_native_step_equals_autograd_in_float64(activation, hidden, latent, epsilon_std, beta, clip, zeros):
    """The float32 native step against autograd through the model in float64: loss, its two
    terms and every gradient, to float32's rounding; with an input of mostly zeros, through the
    first layer's sparse products."""
    library()
    torch.manual_seed(0)
    config = ModelConfig(
        input_shape=(1, 6, 5), hidden=hidden, latent_dim=latent, activation=activation,
        epsilon_std=epsilon_std, bernoulli_clip=clip,
    )
    model = build_model(config)
    with torch.no_grad():
        model.decoder.out.weight.mul_(8)  # logits of up to about +-20: some clipped, some not
    reference = copy.deepcopy(model).double()
    x = torch.rand(9, 30)
    if zeros:  # (a quarter of the pixels, one image all zeros, a NaN-free input as data is)
        x = torch.where(torch.rand(9, 30) < 0.25, x, 0.0)
        x[4] = 0.0
    target, eps = torch.bernoulli(x), torch.randn(9, latent)
    step = NativeMLPStep(model)
    assert (step._nonzeros(x) is not None) == zeros
    loss, recon, kl = step(x, target, eps, beta, 1 / 9)
    expected = autograd_step(
        reference, x.double(), target.double(), eps.double(), beta, 1 / 9, contextlib.nullcontext
    )
    for got, want in zip((loss, recon, kl), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=2e-6, msg=name)


def test_native_and_pytorch_paths_train_alike():
    """Twenty steps and updates of the seed's model by each path, from the same weights and data:
    the same losses and weights to float32's rounding (they differ in the last bits only)."""
    library()
    torch.manual_seed(0)
    start = build_model(ModelConfig(hidden=(64,), latent_dim=2, bernoulli_clip=1e-7))
    runs = []
    for use_native in (True, False):
        from vaelab.optim import RMSprop

        model = copy.deepcopy(start)
        step = NativeMLPStep(model) if use_native else FusedMLPStep(model)
        optimizer = RMSprop([step.flat], lr=1e-3, alpha=0.9, eps=1e-7)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(20):
            x = torch.rand(50, 784, generator=g)
            eps = torch.randn(50, 2, generator=g)
            losses.append(step(x, x, eps, 1.0, 1 / 50)[0].item())
            optimizer.step()
        runs.append((np.array(losses), step.flat.detach().clone()))
    (l_native, w_native), (l_torch, w_torch) = runs
    np.testing.assert_allclose(l_native, l_torch, rtol=1e-5)
    torch.testing.assert_close(w_native, w_torch, rtol=1e-4, atol=1e-5)


def _softplus64(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def test_bernoulli_head_against_float64_mathematics():
    """One logit at a time over [-100, 100] and beyond: softplus(l) - t l to a relative 1e-6 (also
    where it is 1e-30, and for t = 1 where it is small next to l), and scale (sigmoid(l) - t),
    against Python's float64 math."""
    lib = library()
    values = [*np.linspace(-100, 100, 2001).tolist(), -87.5, -87.3, -86.9, -1e-30, 0.0, 1e-30, 1e4, -1e4]
    l, t = torch.zeros(1, 1), torch.zeros(1, 1)
    dl, db, work = torch.zeros(1, 1), torch.zeros(1), torch.zeros(1)
    for value in values:
        for target in (0.0, 0.3, 1.0):
            l[0, 0], t[0, 0] = value, target
            x = float(l[0, 0])  # the float32 logit
            got = lib.bernoulli_head(ptr(l), ptr(t), 1, 1, math.inf, 0.5, ptr(dl), ptr(db), ptr(work))
            want = _softplus64(x) - float(t[0, 0]) * x
            # (float32's rounding of t l aside, which no formula avoids)
            tolerance = 1e-6 * abs(want) + 1e-7 * abs(float(t[0, 0]) * x) + 1e-37
            assert abs(got - want) <= tolerance, (x, target, got, want)
            sigmoid = 1 / (1 + math.exp(-x)) if x > -700 else 0.0
            assert abs(dl.item() - 0.5 * (sigmoid - float(t[0, 0]))) <= 1e-7, (x, target)
            assert db.item() == dl.item()


def test_bernoulli_head_sums_clips_and_passes_nans_on():
    """A batch: the total, each gradient and the column sums against PyTorch in float64; the clip
    cuts the gradient outside (-bound, bound) as clamp's backward does; a NaN logit makes the loss
    and its own gradient NaN (the trainer's NaN check must see it)."""
    lib = library()
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(13, 53, generator=g) * 10, torch.rand(13, 53, generator=g)
    dl, db, work = torch.empty(13, 53), torch.empty(53), torch.empty(53)
    total = lib.bernoulli_head(ptr(logits), ptr(target), 13, 53, 6.0, 0.25, ptr(dl), ptr(db), ptr(work))
    # rows wider than a thread's scratch on its stack go one by one, through `work`: the same numbers
    wide = torch.cat([logits, torch.zeros(13, 5000)], 1), torch.cat([target, torch.zeros(13, 5000)], 1)
    dl_wide, db_wide, work_wide = torch.empty(13, 5053), torch.empty(5053), torch.empty(5053)
    total_wide = lib.bernoulli_head(
        ptr(wide[0]), ptr(wide[1]), 13, 5053, 6.0, 0.25, ptr(dl_wide), ptr(db_wide), ptr(work_wide)
    )
    assert total_wide == pytest.approx(total + 13 * 5000 * math.log(2), rel=1e-6)
    assert torch.equal(dl_wide[:, :53], dl) and torch.equal(db_wide[:53], db)
    l64, t64 = logits.double(), target.double()
    clamped = l64.clamp(-6.0, 6.0)
    want = torch.nn.functional.binary_cross_entropy_with_logits(clamped, t64, reduction="sum").item()
    assert total == pytest.approx(want, rel=1e-6)
    want_dl = torch.where(l64.abs() < 6.0, 0.25 * (torch.sigmoid(clamped) - t64), 0.0)
    torch.testing.assert_close(dl.double(), want_dl, rtol=0, atol=1e-7)
    torch.testing.assert_close(db.double(), dl.double().sum(0), rtol=0, atol=1e-6)
    assert (dl[l64.abs() >= 6.0] == 0).all() and (l64.abs() >= 6.0).any()
    logits[4, 7] = math.nan
    total = lib.bernoulli_head(ptr(logits), ptr(target), 13, 53, 6.0, 0.25, ptr(dl), ptr(db), ptr(work))
    assert math.isnan(total) and dl[4, 7].isnan() and dl.isnan().sum() == 1


def test_reparameterize_and_latent_back_against_float64():
    """The latent layer forward (std, z, the closed-form KL) and the gradients of the means and
    log-variances, against the same formulas in float64; a NaN log-variance gives a NaN KL."""
    lib = library()
    g = torch.Generator().manual_seed(0)
    mean, log_var, eps = (torch.randn(11, 5, generator=g) * 3 for _ in range(3))
    std, noise, z = torch.empty(3, 11, 5)
    kl = lib.reparameterize(ptr(mean), ptr(log_var), ptr(eps), 11, 5, 0.5, ptr(std), ptr(noise), ptr(z))
    m, v, e = mean.double(), log_var.double(), eps.double() * 0.5
    assert kl == pytest.approx((-0.5 * (1 + v - m**2 - v.exp())).sum().item(), rel=1e-6)
    torch.testing.assert_close(std.double(), (0.5 * v).exp(), rtol=1e-6, atol=0)
    torch.testing.assert_close(z.double(), m + (0.5 * v).exp() * e, rtol=1e-6, atol=1e-6)
    dz = torch.randn(11, 5, generator=g)
    dmean, dlog_var, dbm, dbv = torch.empty(11, 5), torch.empty(11, 5), torch.empty(5), torch.empty(5)
    lib.latent_back(ptr(dz), ptr(mean), ptr(std), ptr(noise), 11, 5, 0.3, ptr(dmean), ptr(dlog_var),
                    ptr(dbm), ptr(dbv))
    s = std.double()
    want_dm = dz.double() + 0.3 * m
    want_dv = dz.double() * e * s / 2 + (s * s - 1) * 0.15
    torch.testing.assert_close(dmean.double(), want_dm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dlog_var.double(), want_dv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbm.double(), want_dm.sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dbv.double(), want_dv.sum(0), rtol=1e-5, atol=1e-4)
    log_var[3, 2] = math.nan
    kl = lib.reparameterize(ptr(mean), ptr(log_var), ptr(eps), 11, 5, 0.5, ptr(std), ptr(noise), ptr(z))
    assert math.isnan(kl)


@pytest.mark.parametrize("activation, code", [("relu", 0), ("tanh", 1), ("elu", 2)])
def test_activation_back_is_the_activations_derivative(activation, code):
    """dh * act'(a) from the output h = act(a), against autograd in float64; and the column sums."""
    lib = library()
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(7, 19, generator=g) * 2).double().requires_grad_()
    h = {"relu": torch.relu, "tanh": torch.tanh, "elu": torch.nn.functional.elu}[activation](a)
    upstream = torch.randn(7, 19, generator=g).double()
    (want,) = torch.autograd.grad(h, a, upstream)
    dh, db, out = upstream.float().clone(), torch.empty(19), h.detach().float().contiguous()
    lib.activation_back(ptr(dh), ptr(out), 7, 19, code, ptr(db))
    torch.testing.assert_close(dh.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db.double(), want.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 9), (8, 8), (9, 17), (33, 65), (100, 784), (256, 100)])
def test_transpose_moves_every_element(rows, cols):
    """transpose: 8 x 8 register blocks (where the CPU has AVX) and the edges element by element;
    each element exactly where src.t() has it, NaN and -0.0 included."""
    lib = library()
    src = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    src[rows // 2, cols // 2], src[-1, -1] = math.nan, -0.0
    dst = torch.full((cols, rows), 7.5)
    lib.transpose(ptr(src), rows, cols, ptr(dst))
    assert torch.equal(dst.isnan(), src.t().isnan())
    assert torch.equal(dst.nan_to_num(), src.t().nan_to_num())
    assert torch.equal(dst.signbit(), src.t().signbit())


def test_sparse_rows_and_columns_list_every_nonzero_in_order():
    """sparse_rows: each row's nonzeros (a NaN counts, as it must reach the product) in column
    order, -1 once there are more than allowed; sparse_columns: the same by columns, rows in order."""
    lib = library()
    g = torch.Generator().manual_seed(3)
    x = torch.where(torch.rand(13, 41, generator=g) < 0.3, torch.rand(13, 41, generator=g), 0.0)
    x[2, 5], x[7] = math.nan, 0.0
    nonzero = (x != 0) | x.isnan()
    nnz = int(nonzero.sum())
    row_start, vals = torch.zeros(14, dtype=torch.int32), torch.zeros(13 * 41 + 16)
    cols = torch.zeros(13 * 41 + 16, dtype=torch.int32)
    assert lib.sparse_rows(ptr(x), 13, 41, nnz - 1, ptr(row_start), ptr(cols), ptr(vals)) == -1
    assert lib.sparse_rows(ptr(x), 13, 41, nnz, ptr(row_start), ptr(cols), ptr(vals)) == nnz
    _, want_cols = nonzero.nonzero(as_tuple=True)  # (row-major order)
    assert row_start.tolist() == [0, *nonzero.sum(1).cumsum(0).tolist()]
    assert cols[:nnz].tolist() == want_cols.tolist()
    assert torch.equal(vals[:nnz].nan_to_num(-1), x[nonzero].nan_to_num(-1))
    col_start, col_vals = torch.zeros(42, dtype=torch.int32), torch.zeros(nnz)
    rows = torch.zeros(nnz, dtype=torch.int32)
    lib.sparse_columns(ptr(row_start), ptr(cols), ptr(vals), 13, 41, ptr(col_start), ptr(rows), ptr(col_vals))
    by_column = nonzero.t().nonzero(as_tuple=True)  # (column, row) pairs, columns first
    assert col_start.tolist() == [0, *nonzero.sum(0).cumsum(0).tolist()]
    assert rows.tolist() == by_column[1].tolist()
    assert torch.equal(col_vals.nan_to_num(-1), x.t()[nonzero.t()].nan_to_num(-1))


def test_the_first_layer_skips_zeros_only_in_sparse_batches():
    """Up to SPARSE_MAX_DENSITY nonzero inputs the first layer's products skip the zeros; beyond,
    they are dense. Both give the PyTorch path's numbers to float32's rounding."""
    from vaelab.native import mlp

    library()
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=(64,), latent_dim=2))
    step, reference = NativeMLPStep(model), FusedMLPStep(copy.deepcopy(model))
    n = 40 * 784
    for share, sparse in ((0.2, True), (mlp.SPARSE_MAX_DENSITY, True), (0.5, False), (1.0, False)):
        x = torch.rand(40, 784).clamp_min(1e-3)  # (no zeros of its own)
        x.view(-1)[torch.randperm(n)[: n - int(share * n)]] = 0.0
        assert (step._nonzeros(x) is not None) == sparse, share
        eps = torch.randn(40, 2)
        got, want = step(x, x, eps, 1.0, 1 / 40), reference(x, x, eps, 1.0, 1 / 40)
        torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(step.flat.grad, reference.flat.grad, rtol=1e-4, atol=1e-6)


class _Recorder:
    """The native library, noting each call's name and arguments."""

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def __getattr__(self, name):
        function = getattr(self.lib, name)

        def call(*args):
            self.calls.append((name, args))
            return function(*args)

        return call

    def products(self) -> list[tuple[int, int]]:
        """(rows, columns) of each sparse_product's result."""
        return [(a[3], a[5]) for name, a in self.calls if name == "sparse_product"]


def _with_zeros(rows: int, cols: int, share: float) -> torch.Tensor:
    """A (rows, cols) float32 matrix of which `share` is nonzero (normal values), the rest 0."""
    x = torch.randn(rows, cols)
    x.view(-1)[torch.randperm(rows * cols)[: rows * cols - int(share * rows * cols)]] = 0.0
    return x


@pytest.mark.parametrize(
    "dy_share, x_share, way",
    [
        (0.12, 1.0, "dy"),  # a ReLU layer's gradient behind mostly dead units, dense input
        (0.12, 0.2, "dy"),  # the seed's first layer on MNIST: both sparse, dy the sparser
        (0.2, 0.2, "dy"),  # a tie: dy's way, which needs no transposes
        (0.25, 0.15, "x"),  # x the sparser
        (0.5, 0.2, "x"),  # early in training: half the units alive
        (0.5, 1.0, "dense"),
    ],
)
def test_weight_gradient_skips_the_zeros_of_the_sparser_operand(dy_share, x_share, way):
    """dy' x over dy's nonzeros (rows of dy' against x's rows), over x's (the forward pass's
    list), or dense, whichever has the fewest terms up to SPARSE_MAX_DENSITY: each equal to the
    product in float64 to float32's rounding, and dy's way bit-identical to x's (the same
    products summed in the same order, rows of the batch ascending)."""
    library()
    torch.manual_seed(0)
    rows, width, d = 60, 48, 100
    step = NativeMLPStep(build_model(ModelConfig(input_shape=(1, 10, 10), hidden=(width,), latent_dim=2)))
    dy, x = _with_zeros(rows, width, dy_share), _with_zeros(rows, d, x_share)
    sparse_x = step._nonzeros(x) if x_share < 1 else None
    assert (sparse_x is not None) == (x_share < 1)
    step.native = recorder = _Recorder(step.native)
    out = torch.full((width, d), math.nan)
    step._weight_grad(out, dy.clone(), x, relu=True, sparse_x=sparse_x)
    expected = {"dy": [(width, d)], "x": [(d, width)], "dense": []}[way]
    assert recorder.products() == expected
    torch.testing.assert_close(out.double(), dy.double().t() @ x.double(), rtol=1e-5, atol=1e-5)
    if way == "dy" and sparse_x is not None:
        by_x = torch.full_like(out, math.nan)
        step._sparse_weight_grad(by_x, dy, sparse_x, d)
        assert torch.equal(out, by_x)


@pytest.mark.parametrize("whole", [True, False])
def test_native_step_through_a_layer_of_mostly_dead_units_equals_autograd(whole):
    """A ReLU layer whose units are mostly off (its gradient mostly zeros, as the seed's first
    layer's is once trained): the step's weight gradient over dy's nonzeros, with a dense input
    and with a sparse one, against autograd in float64; in step.c's one call (`mlp_step`, where
    the library has the products' tiles) and call by call."""
    library()
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_shape=(1, 10, 10), hidden=(64,), latent_dim=2))
    with torch.no_grad():
        model.encoder.body[0].bias[8:] = -50.0  # 56 of the 64 units never fire
    reference = copy.deepcopy(model).double()
    for x in (torch.rand(30, 100), torch.where(torch.rand(30, 100) < 0.25, torch.rand(30, 100), 0.0)):
        step, eps = NativeMLPStep(model), torch.randn(30, 2)
        step.whole = whole = whole and step.whole
        step.native = recorder = _Recorder(step.native)
        loss = step(x, x, eps, 1.0, 1 / 30)
        if whole:  # (the first layer's gradient, by its units)
            assert step.ways & 2 and [name for name, _ in recorder.calls][-1:] == ["mlp_step"]
        else:
            assert (64, 100) in recorder.products()
        x64, eps64 = x.double(), eps.double()
        want = autograd_step(reference, x64, x64, eps64, 1.0, 1 / 30, contextlib.nullcontext)
        torch.testing.assert_close(loss[0].double(), want[0], rtol=2e-6, atol=1e-5)
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=2e-6, msg=name)


def test_sparse_first_layer_gives_the_same_numbers_on_one_thread_and_two():
    """A seed-shaped step on an MNIST-like batch (a fifth of the pixels nonzero), the products
    that skip zeros included: bit-identical losses and gradients with one thread and two."""
    library()
    torch.manual_seed(0)
    step = NativeMLPStep(build_model(ModelConfig(hidden=(256,), latent_dim=2)))
    x = torch.where(torch.rand(100, 784) < 0.2, torch.rand(100, 784), 0.0)
    assert step._nonzeros(x) is not None
    eps, before, results = torch.randn(100, 2), torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = step(x, x, eps, 1.0, 0.01)
            results.append((torch.stack(loss), step.flat.grad.clone()))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the loaded runtimes")
def test_the_library_runs_on_pytorchs_openmp_runtime_or_on_one_thread(tmp_path):
    """Built with OpenMP where PyTorch's runtime is GNU's: one libgomp in the process (PyTorch's),
    never a second pool. An OpenMP build that fails (here a flag the compiler refuses), or
    VAELAB_NATIVE_OPENMP=0, leaves the build without, whose loops run on one thread."""
    library()
    code = (
        "from vaelab import native; from pathlib import Path; lib = native.library(); "
        "maps = Path('/proc/self/maps').read_text().splitlines(); "
        "gomp = {l.split()[-1] for l in maps if 'libgomp' in l.split()[-1]}; "
        "print(lib is not None, native.openmp(), len(gomp), repr(native.reason()))"
    )
    runtime = _python("from vaelab import native; print(native.openmp_runtime())", tmp_path / "r")
    runtime = runtime.stdout.strip()
    out = _python(code, tmp_path / "a")
    if runtime == "None":
        assert out.stdout.split()[:2] == ["True", "False"], out.stderr
        pytest.skip("PyTorch here does not run on GNU OpenMP")
    assert out.stdout.split() == ["True", "True", "1", "''"], out.stderr
    bogus = code.replace(
        "lib = native.library()", "native._openmp_flags = lambda: ('-fno-such-flag',); lib = native.library()"
    )
    assert _python(bogus, tmp_path / "b").stdout.split() == ["True", "False", "1", "''"]
    assert _python(code, tmp_path / "c", VAELAB_NATIVE_OPENMP="0").stdout.split()[:2] == ["True", "False"]


def test_native_rmsprop_is_keras3_rmsprop(monkeypatch):
    """RMSprop on float32 CPU weights takes step.c's one pass, which is Keras 3's formula: against
    it written out in float64, with exact-zero and tiny gradients, over 50 steps."""
    library()
    from vaelab import optim

    calls = []
    original = optim._rmsprop_update_native
    monkeypatch.setattr(optim, "_rmsprop_update_native", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(300))
    p, v = weight.detach().double().clone(), torch.zeros(300, dtype=torch.float64)
    optimizer = optim.RMSprop([weight], lr=1e-3, alpha=0.9, eps=1e-7)
    for _ in range(50):
        g = torch.randn(300) * torch.logspace(-8, 1, 300)
        g[:30] = 0
        weight.grad = g.clone()
        optimizer.step()
        v = 0.9 * v + 0.1 * g.double() ** 2
        p -= 1e-3 * g.double() / torch.sqrt(v + 1e-7)
    assert len(calls) == 50
    torch.testing.assert_close(weight.detach().double(), p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(optimizer.state[weight]["square_avg"].double(), v, rtol=1e-5, atol=1e-12)


def _python(code: str, home, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "VAELAB_HOME": str(home), **env}
    if "VAELAB_NATIVE" not in env:
        environment.pop("VAELAB_NATIVE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)


WHY = "from vaelab import native; print(native.library() is None, '|', native.reason())"


def test_a_missing_or_failing_compiler_leaves_the_pytorch_path(tmp_path):
    """No compiler, a compiler that fails, or VAELAB_NATIVE=0: no library, one line of why, and
    nothing half-built left in the cache."""
    out = _python(WHY, tmp_path / "a", CC=str(tmp_path / "no-such-cc"))
    assert out.stdout.strip() == f"True | no C compiler found ({tmp_path / 'no-such-cc'})", out.stderr
    out = _python(WHY, tmp_path / "b", CC="false")
    assert out.stdout.startswith("True | "), out.stderr
    assert list((tmp_path / "b" / "native").iterdir()) == []  # the failed build's file is gone
    assert _python(WHY, tmp_path / "c", VAELAB_NATIVE="0").stdout.strip() == "True | VAELAB_NATIVE=0"


def test_the_library_is_built_once_and_reused(tmp_path):
    """The first process builds the library into $VAELAB_HOME/native; the next loads that file."""
    library()
    first = _python(WHY, tmp_path)
    assert first.stdout.strip() == "False |", first.stderr
    (built,) = (tmp_path / "native").iterdir()
    stamp = built.stat().st_mtime_ns
    assert _python(WHY, tmp_path).stdout.strip() == "False |"
    assert [p.name for p in (tmp_path / "native").iterdir()] == [built.name]
    assert built.stat().st_mtime_ns == stamp


def test_a_build_killed_part_way_leaves_nothing_for_long(tmp_path):
    """A killed build's temporary file is removed by the next build once it is older than a build
    may take; a younger one (another process building now) is left alone."""
    from vaelab import native

    folder = tmp_path / "native"
    folder.mkdir()
    stale, fresh = folder / ".build-killed.so", folder / ".build-running.so"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    long_ago = time.time() - 2 * native.BUILD_SECONDS - 60
    os.utime(stale, (long_ago, long_ago))
    out = _python(WHY, tmp_path)
    assert out.stdout.strip() == "False |", out.stderr
    assert not stale.exists() and fresh.exists()


def test_train_says_in_one_line_that_the_native_code_is_off(tiny_npz, tmp_path):
    """`vaelab train` without a compiler trains on the PyTorch path and says so once."""
    cmd = [sys.executable, "-m", "vaelab", "train", "--data", str(tiny_npz), "--hidden", "16",
           "--epochs", "1", "--no-figures", "--out", str(tmp_path / "run")]
    environment = {**os.environ, "VAELAB_HOME": str(tmp_path / "home"), "CC": str(tmp_path / "no-cc")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=environment)
    assert out.returncode == 0, out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "PyTorch operations" in line]
    assert lines == [
        f"note: the fused step runs as PyTorch operations, up to 1.8x slower (no C compiler found "
        f"({tmp_path / 'no-cc'}))"
    ]
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("latent, clip", [(2, 1e-7), (12, 0.0)])
def test_the_native_test_pass_equals_model_terms(latent, clip):
    """The test pass through `FusedMLPStep.loss_sums` gives `model.terms`' numbers (two chunks of
    images, the same noise) to float32's rounding, and leaves the model's gradients alone."""
    from vaelab.scoring import test_pass

    library()
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=(48,), latent_dim=latent, bernoulli_clip=clip))
    step = NativeMLPStep(model)
    step.flat.grad.normal_()
    grads = step.flat.grad.clone()
    x = torch.randint(0, 256, (2300, 784), dtype=torch.uint8)
    plain = test_pass(model, x, 5, contextlib.nullcontext)
    native_sums = test_pass(model, x, 5, contextlib.nullcontext, sums=step.loss_sums)
    assert native_sums.keys() == plain.keys()
    for key in plain:
        assert native_sums[key] == pytest.approx(plain[key], rel=2e-6), key
    assert torch.equal(step.flat.grad, grads)


NAMES = ["bernoulli_head", "activation_back", "transpose", "rmsprop", "latent_forward",
         "latent_backward", "reparameterize", "latent_back", "sparse_rows", "sparse_columns",
         "sparse_product", "gather_levels", "gemm", "mlp_step"]


@pytest.mark.parametrize("name", NAMES)
def test_the_self_check_refuses_a_library_with_one_wrong_function(name):
    """The check a new library must pass (vaelab.native.check) notices any one function that
    does nothing: a miscompiled library is never used."""
    from vaelab.native.check import failures

    lib = library()
    assert failures(lib) == []

    class OneBroken:
        def __getattr__(self, attr):
            return (lambda *args: 0.0) if attr == name else getattr(lib, attr)

    assert name in failures(OneBroken())


def test_a_native_step_can_be_copied_and_pickled():
    """deepcopy and pickle of the step work as for FusedMLPStep (its ctypes library, which cannot
    be copied, is loaded again in the copy)."""
    import pickle

    library()
    step = NativeMLPStep(build_model(ModelConfig(hidden=(16,), latent_dim=2)))
    for other in (copy.deepcopy(step), pickle.loads(pickle.dumps(step))):
        assert other.native is not None
        assert other._pass.__func__ is NativeMLPStep._native_forward_backward


def test_inputs_the_native_code_cannot_take_go_the_pytorch_way():
    """A noise row broadcast over the batch (which the PyTorch path accepts) or float64 targets
    are not handed to the C as raw memory: the step computes them as FusedMLPStep does."""
    library()
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=(16,), latent_dim=2))
    native_step = NativeMLPStep(model)
    x, eps = torch.rand(5, 784), torch.randn(1, 2)
    got = torch.stack(native_step(x, x, eps, 1.0, 0.2))
    want = torch.stack(native_step._forward_backward(x, x, eps, 1.0, 0.2))
    torch.testing.assert_close(got, want)
    got = torch.stack(native_step(x, x.double(), torch.randn(5, 2), 1.0, 0.2))
    assert got.isfinite().all()


def test_rmsprop_keeps_the_fused_kernel_for_large_models(monkeypatch):
    from vaelab import optim

    library()
    weight = torch.nn.Parameter(torch.randn(50))
    weight.grad = torch.randn(50)
    assert optim._fits_native([weight], [weight.grad], [weight.grad])
    monkeypatch.setattr(optim, "NATIVE_MAX_WEIGHTS", 49)
    assert not optim._fits_native([weight], [weight.grad], [weight.grad])


def test_a_compiler_with_arguments_and_a_damaged_cached_library(tmp_path):
    """CC may be a command with arguments; a cached library file that does not load is built
    again rather than leaving the PyTorch path for good."""
    library()
    assert _python(WHY, tmp_path, CC="env cc").stdout.strip() == "False |"
    (built,) = (tmp_path / "native").iterdir()
    built.write_bytes(b"not a library")
    out = _python(WHY, tmp_path, CC="env cc")
    assert out.stdout.strip() == "False |", out.stderr
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_the_batch_gather_gives_each_grey_level_k_over_255_as_float32_divides(monkeypatch):
    """input_rows (the training loop's batch: a row gather and a conversion in one native pass)
    against numpy's float32 k / 255 for every level, in the images' shape; an index out of range
    raises as index_select does; without the library, or for other kinds of data, the PyTorch
    operations give the same."""
    from vaelab.data.tensors import input_rows, inputs

    library()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=g)
    images[7].view(-1)[:] = torch.arange(64)  # every level somewhere
    images[8].view(-1)[:] = torch.arange(192, 256)
    idx = torch.tensor([7, 8, 0, 49, 7, 3])
    got = input_rows(images, idx)
    want = images.numpy()[idx.numpy()].astype(np.float32) / np.float32(255)
    assert got.shape == (6, 1, 8, 8) and got.dtype == torch.float32
    assert np.array_equal(got.numpy(), want)
    assert torch.equal(input_rows(images, idx[:0]), inputs(images[:0]))
    with pytest.raises(IndexError):
        input_rows(images, torch.tensor([0, 50]))
    with pytest.raises(IndexError):
        input_rows(images, torch.tensor([-51]))
    for other in (images > 100, images.float()):  # bool pixels, floats: as inputs() has them
        assert torch.equal(input_rows(other, idx), inputs(other.index_select(0, idx)))
    monkeypatch.setattr(native, "library", lambda: None)  # (as without a compiler)
    assert torch.equal(input_rows(images, idx), got)


@pytest.mark.parametrize(
    "rows, inner, cols",
    [(1, 1, 1), (10, 7, 32), (9, 33, 48), (11, 5, 17), (100, 256, 784), (121, 3, 15), (250, 40, 70)],
)
@pytest.mark.parametrize("a_transposed", [False, True])
def test_gemm_is_the_product_in_float64(rows, inner, cols, a_transposed):
    """step.c's dense product against float64, with a bias and without, the left operand row-major
    or read in place as a transposed view: whole 10 x 32 tiles, 16-column tiles, the last columns
    one by one, fewer rows than a tile, and more rows than one pass over B takes (120)."""
    lib = library()
    torch.manual_seed(0)
    a = torch.randn(inner, rows).t() if a_transposed else torch.randn(rows, inner)
    b, bias = torch.randn(inner, cols), torch.randn(cols)
    for with_bias in (True, False):
        out = torch.full((rows, cols), math.nan)
        lib.gemm(
            ptr(a), a.stride(0), a.stride(1), ptr(b), cols, ptr(bias) if with_bias else None, ptr(out),
            rows, inner, cols,
        )
        want = a.double() @ b.double() + (bias.double() if with_bias else 0.0)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * math.sqrt(inner))


def test_gemm_passes_nans_and_infinities_on():
    """A NaN or an infinity in an operand reaches the result as in PyTorch's product (no fast-math
    shortcut drops it: the trainer's NaN check must see it)."""
    lib = library()
    a, b = torch.randn(12, 8), torch.randn(8, 40)
    a[3, 2], b[5, 33] = math.nan, math.inf
    out = torch.empty(12, 40)
    lib.gemm(ptr(a), 8, 1, ptr(b), 40, None, ptr(out), 12, 8, 40)
    want = a @ b
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())


@pytest.mark.parametrize("way", ["whole", "calls", "onednn"])
def test_a_seed_sized_step_with_the_products_in_step_c_equals_autograd(way):
    """The seed's shapes (784-256-2-256-784, a batch of 100, an MNIST-like input): the step's loss
    and every gradient equal autograd's in float64 to float32's rounding, whether it is one call
    into step.c (`mlp_step`), a call per part with the large products in step.c's gemm, or with
    them in oneDNN (as on CPUs without AVX-512 or AVX2 and FMA, whose library has no tiles)."""
    lib = library()
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=(256,), latent_dim=2, bernoulli_clip=1e-7))
    reference = copy.deepcopy(model).double()
    x = torch.where(torch.rand(100, 784) < 0.2, torch.rand(100, 784), 0.0)
    eps = torch.randn(100, 2)
    step = NativeMLPStep(model)
    if not lib.gemm_tiled() and way != "onednn":
        pytest.skip("this CPU's library has no tiles for the products (no AVX-512, no AVX2 with FMA)")
    step.whole, step.tiled = way == "whole", way != "onednn"
    step.native = recorder = _Recorder(step.native)
    loss = step(x, x, eps, 1.0, 0.01)
    if way == "whole":
        assert [name for name, _ in recorder.calls][-1:] == ["mlp_step"] and step.ways & 1
    gemms = [a[7:] for name, a in recorder.calls if name == "gemm"]  # (rows, inner, columns)
    assert gemms == ([(100, 256, 784), (784, 100, 256), (100, 784, 256)] if way == "calls" else [])
    x64 = x.double()
    want = autograd_step(reference, x64, x64, eps.double(), 1.0, 0.01, contextlib.nullcontext)
    for got, expected in zip(loss, want, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-4)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=2e-6, msg=name)


def test_the_whole_step_in_one_call_is_the_step_call_by_call():
    """step.c's `mlp_step` does the per-call path's arithmetic in the same order: ten seed-sized
    steps and RMSprop updates give bit-identical losses and weights either way, on one thread and
    on two (MNIST-like inputs, so the first layer's sparse ways are taken)."""
    lib = library()
    if not lib.gemm_tiled():
        pytest.skip("this CPU's library has no tiles for the products (no AVX-512, no AVX2 with FMA)")
    from vaelab.optim import RMSprop

    torch.manual_seed(0)
    start, runs, before = build_model(ModelConfig(hidden=(256,), latent_dim=2)), [], torch.get_num_threads()
    try:
        for whole, threads in ((True, 2), (False, 2), (True, 1)):
            torch.set_num_threads(threads)
            step = NativeMLPStep(copy.deepcopy(start))
            assert step.whole
            step.whole = whole
            optimizer, g, losses = RMSprop([step.flat], lr=1e-3, alpha=0.9, eps=1e-7), torch.Generator(), []
            g.manual_seed(1)
            for _ in range(10):
                x = torch.rand(100, 784, generator=g)
                x = torch.where(torch.rand(100, 784, generator=g) < 0.2, x, 0.0)
                losses.append(torch.stack(step(x, x, torch.randn(100, 2, generator=g), 1.0, 0.01)))
                optimizer.step()
            runs.append((torch.stack(losses), step.flat.detach().clone()))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


def test_an_avx2_build_passes_its_check_with_the_tiles_and_the_whole_step(tmp_path):
    """The library as a CPU with AVX2 and FMA but no AVX-512 builds it (here -march=x86-64-v3 on
    whatever CPU runs the tests): its self-check against float64 passes, every function included
    (gemm's 6 x 16 tiles and the whole step among them), it has the products' tiles, and the
    seed's model takes the whole step."""
    library()
    if not {"avx2", "fma"} <= set(native._cpu_features().split()):
        pytest.skip("this CPU has no AVX2 with FMA")
    code = (
        "from vaelab import native; "
        "native.FLAGS = tuple('-march=x86-64-v3' if f == '-march=native' else f for f in native.FLAGS); "
        "lib = native.library(); print(lib is not None, repr(native.reason())); "
        "from vaelab.config import ModelConfig; from vaelab.models import build_model; "
        "from vaelab.native.mlp import NativeMLPStep; "
        "print(lib.gemm_tiled(), NativeMLPStep(build_model(ModelConfig())).whole)"
    )
    out = _python(code, tmp_path)
    if "x86-64-v3" in out.stdout + out.stderr:  # (a compiler too old for the name)
        pytest.skip(f"the compiler does not know -march=x86-64-v3: {out.stdout.strip()}")
    assert out.stdout.split() == ["True", "''", "1", "True"], out.stdout + out.stderr


def test_inputs_of_the_wrong_width_are_refused_not_read_past():
    """step.c trusts the width it is given: x wider or narrower than the model's input takes the
    PyTorch path, which refuses it with a shape error (the native step would read and write past
    the weights' and gradients' ends)."""
    library()
    step = NativeMLPStep(build_model(ModelConfig(input_shape=(1, 10, 10), hidden=(32,), latent_dim=2)))
    eps = torch.randn(20, 2)
    assert step._fits(torch.rand(20, 100), torch.rand(20, 100), eps)
    for d in (101, 99):
        x = torch.rand(20, d)
        assert not step._fits(x, x, eps)
        with pytest.raises(RuntimeError):
            step(x, x, eps, 1.0, 0.05)
