"""The fused MLP step and vaelab's RMSprop against their oracles: autograd and torch.optim."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from vaelab.config import ModelConfig
from vaelab.models import build_model
from vaelab.optim import RMSprop
from vaelab.steps import FusedMLPStep, autograd_step


@pytest.mark.parametrize(
    "activation, hidden, latent, epsilon_std, beta",
    [("relu", (32,), 2, 1.0, 1.0), ("tanh", (24, 16), 3, 0.5, 0.3), ("elu", (16, 8), 1, 1.0, 2.0)],
)
def test_fused_step_equals_autograd(activation, hidden, latent, epsilon_std, beta):
    torch.manual_seed(0)
    config = ModelConfig(
        input_shape=(1, 6, 5),
        hidden=hidden,
        latent_dim=latent,
        activation=activation,
        epsilon_std=epsilon_std,
    )
    model = build_model(config).double()
    x = torch.rand(9, 30, dtype=torch.float64)
    target = torch.bernoulli(x)
    eps = torch.randn(9, latent, dtype=torch.float64)
    scale = 1 / 9
    loss_a, recon_a, kl_a = autograd_step(model, x, target, eps, beta, scale, contextlib.nullcontext)
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    loss_f, recon_f, kl_f = FusedMLPStep(model)(x, target, eps, beta, scale)
    torch.testing.assert_close(loss_f, loss_a)
    torch.testing.assert_close(recon_f, recon_a)
    torch.testing.assert_close(kl_f, kl_a)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_fused_step_with_keras_clipping_equals_autograd():
    """With Keras' probability clipping (the seed preset), beyond the clip the loss is flat and
    the gradient zero, in the fused step as in autograd through torch.clamp."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_shape=(1, 6, 5), hidden=(8,), latent_dim=2, bernoulli_clip=0.01))
    model = model.double()
    with torch.no_grad():
        model.decoder.out.weight.mul_(20)  # many logits beyond +-log(99)
    x = torch.rand(9, 30, dtype=torch.float64)
    eps = torch.randn(9, 2, dtype=torch.float64)
    loss_a, recon_a, kl_a = autograd_step(model, x, x, eps, 1.0, 1 / 9, contextlib.nullcontext)
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    loss_f, recon_f, kl_f = FusedMLPStep(model)(x, x, eps, 1.0, 1 / 9)
    torch.testing.assert_close(recon_f, recon_a)
    torch.testing.assert_close(kl_f, kl_a)
    torch.testing.assert_close(loss_f, loss_a)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "change, fused",
    [
        ({}, True),  # the seed: MLP, Bernoulli, ELBO with one sample, float32
        ({"hidden": (8, 8), "activation": "tanh"}, True),
        ({"likelihood": "continuous-bernoulli"}, False),  # the hand-derived backward is Bernoulli's
        ({"likelihood": "gaussian"}, False),
        ({"likelihood": "gaussian-learned"}, False),
        ({"conditional": True, "num_classes": 10}, False),  # it never sees a label
        ({"architecture": "conv", "input_shape": (1, 28, 28)}, False),
        ({"objective": "iwae", "k": 5}, False),  # one sample, the ELBO only
        ({"k": 3}, False),
        ({"precision": "bf16"}, False),  # autocast goes through autograd
        ({"fused": False}, False),
    ],
)
def test_the_hand_derived_step_is_chosen_only_where_it_computes_the_objective(change, fused):
    """make_step must not give the Bernoulli ELBO's hand-derived gradients to any model or objective
    whose loss is something else: training would then optimise the wrong objective silently."""
    from vaelab.steps import make_step

    change = dict(change)
    names = ("objective", "k", "precision", "fused")
    step_options = {name: change.pop(name) for name in names if name in change}
    model = build_model(ModelConfig(**{"hidden": (8,), "latent_dim": 2, **change}))
    step = make_step(model, step_options.pop("precision", "fp32"), **step_options)
    assert isinstance(step, FusedMLPStep) == fused


def test_rmsprop_is_keras3_rmsprop():
    """Against Keras 3's update written out in numpy (float64): v = rho v + (1 - rho) g^2,
    p -= lr g / sqrt(v + eps). Small and exact-zero gradients are where the formulas differ."""
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 5)
    params = [p.detach().double().numpy().copy() for p in model.parameters()]
    velocity = [np.zeros_like(p) for p in params]
    ours = RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    for _ in range(20):
        x = torch.randn(11, 7)
        x[:, 0] = 0  # weights of input 0 get exact-zero gradients
        x[:, 1] *= 1e-4  # and input 1 tiny ones
        ours.zero_grad()
        model(x).pow(2).sum().backward()
        grads = [p.grad.double().numpy() for p in model.parameters()]
        ours.step()
        for p, v, g in zip(params, velocity, grads, strict=True):
            v[...] = 0.9 * v + 0.1 * g * g
            p -= 1e-3 * g / np.sqrt(v + 1e-7)
    for got, expected in zip(model.parameters(), params, strict=True):
        np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=1e-5, atol=1e-7)
    # the state dict has torch's layout, so it loads into torch's RMSprop (same state names)
    torch.optim.RMSprop(model.parameters()).load_state_dict(ours.state_dict())


def test_rmsprop_step_hooks_and_the_profiler_still_see_each_step(monkeypatch):
    """RMSprop.step skips torch's wrapper only when nothing would see it: its own and global step
    hooks run, a profiler records `Optimizer.step#RMSprop.step`, and otherwise the update is
    called directly (the same update either way)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    p = torch.nn.Parameter(torch.ones(10))
    p.grad = torch.full((10,), 0.5)
    opt, calls = RMSprop([p]), []
    wrapped = RMSprop._hooked_update_all

    def counted(self, closure=None):
        calls.append("wrapped")
        return wrapped(self, closure)

    monkeypatch.setattr(RMSprop, "_hooked_update_all", counted)
    opt.step()
    assert calls == []
    handles = [
        opt.register_step_pre_hook(lambda *a: calls.append("pre")),
        opt.register_step_post_hook(lambda *a: calls.append("post")),
        register_optimizer_step_pre_hook(lambda *a: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda *a: calls.append("global post")),
    ]
    try:
        opt.step()
    finally:  # (a global hook left behind would see every other test's steps)
        for h in handles:
            h.remove()
    assert calls == ["wrapped", "global pre", "pre", "post", "global post"]
    with torch.profiler.profile() as prof:
        opt.step()
    assert "Optimizer.step#RMSprop.step" in [e.name for e in prof.events()]
    opt.step()
    assert calls.count("wrapped") == 2  # (the hooks' step and the profiled one, not the last)
    # the four steps were Keras' update from v = 0 with g = 0.5
    v, w = 0.0, 1.0
    for _ in range(4):
        v = 0.9 * v + 0.1 * 0.25
        w -= 1e-3 * 0.5 / np.sqrt(v + 1e-7)
    torch.testing.assert_close(p.detach(), torch.full((10,), w, dtype=torch.float32))


def test_rmsprop_fused_kernel_is_the_five_pass_update():
    """On a CPU the update runs through PyTorch's fused Adam kernel (beta1 = 0, no bias
    correction, eps moved under the root by shifting v). In float64 it must give the weights and
    the mean squares of the five-pass form to rounding, for large, tiny and exact-zero gradients,
    over enough steps for any bias correction or leftover shift to show."""
    from vaelab import optim

    torch.manual_seed(0)
    n = 1000
    fused_p = torch.randn(n, dtype=torch.float64)
    plain_p = fused_p.clone()
    fused_v, plain_v = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    assert optim._fits_fused_kernel([fused_p], [fused_p], [fused_v], 0.9)
    for step in range(200):
        g = torch.randn(n, dtype=torch.float64) * torch.logspace(-9, 1, n, dtype=torch.float64)
        g[:50] = 0  # never a gradient
        if step % 2:
            g[50:100] = 0  # sometimes one
        lr = 1e-3 if step < 100 else 3e-4  # a schedule changes the rate
        optim._rmsprop_update_fused([fused_p], [g.clone()], [fused_v], lr, 0.9, 1e-7)
        optim._rmsprop_update([plain_p], [g.clone()], [plain_v], lr, 0.9, 1e-7)
    torch.testing.assert_close(fused_p, plain_p, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(fused_v, plain_v, rtol=1e-10, atol=1e-20)
    assert fused_v[:50].abs().max() < 1e-20  # the shift leaves no trace where v stays zero


def test_rmsprop_takes_the_fused_kernel_only_where_it_is_exact(monkeypatch):
    """RMSprop.step uses the fused kernel for contiguous CPU tensors of one dtype and an alpha
    whose bias correction vanishes, and the five passes otherwise; both give Keras' update."""
    from vaelab import optim

    calls = []
    fused = optim._rmsprop_update_fused
    monkeypatch.setattr(optim, "_rmsprop_update_fused", lambda *a: calls.append(1) or fused(*a))

    def run(make, alpha):
        """Three steps of RMSprop on the weight `make()` returns, against Keras' rule (float64)."""
        torch.manual_seed(0)
        weight = torch.nn.Parameter(make())
        expected, v = weight.detach().clone(), torch.zeros_like(weight)
        optimizer = RMSprop([weight], lr=1e-2, alpha=alpha, eps=1e-7)
        for _ in range(3):
            g = torch.randn(weight.shape, dtype=torch.float64)
            weight.grad = g.clone()  # contiguous, whatever the weight's layout
            optimizer.step()
            v = alpha * v + (1 - alpha) * g * g
            expected -= 1e-2 * g / torch.sqrt(v + 1e-7)
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-14)
        return len(calls)

    def square():
        return torch.randn(6, 4, dtype=torch.float64)

    def transposed():  # a non-contiguous weight: the kernel would pair the wrong elements
        return torch.randn(4, 6, dtype=torch.float64).t()

    assert run(square, 0.9) == 3  # the fused kernel, each step
    calls.clear()
    assert run(transposed, 0.9) == 0  # the five passes
    assert run(square, 1 - 1e-9) == 0  # 1 - alpha ** 1e9 is not 1: Adam's correction would show
    v = torch.zeros(3, dtype=torch.float64)
    assert not optim._fits_fused_kernel([v], [v], [v], 1.0)
    assert not optim._fits_fused_kernel([v, v.float()], [v, v.float()], [v, v.float()], 0.9)
    assert not optim._fits_fused_kernel([v.bfloat16()], [v.bfloat16()], [v.bfloat16()], 0.9)


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_flat_parameters_train_like_separate_weights(optimizer):
    """The fused step optimizes one flat parameter whose views are the weights: ten steps of it
    give the weights of ten autograd steps with the optimizer over each weight (float64)."""
    from vaelab.config import RunConfig, TrainConfig
    from vaelab.train import make_optimizer

    config = RunConfig(train=TrainConfig(optimizer=optimizer, lr=1e-2))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(ModelConfig(input_shape=(1, 6, 5), hidden=(16, 8), latent_dim=3)).double())
    plain, flat_model = models
    fused = FusedMLPStep(flat_model)
    opt_plain = make_optimizer(list(plain.parameters()), config)
    opt_flat = make_optimizer([fused.flat], config)
    for _ in range(10):
        x = torch.rand(9, 30, dtype=torch.float64)
        eps = torch.randn(9, 3, dtype=torch.float64)
        autograd_step(plain, x, x, eps, 1.0, 1 / 9, contextlib.nullcontext)
        opt_plain.step()
        fused(x, x, eps, 1.0, 1 / 9)
        opt_flat.step()
    for (name, a), b in zip(plain.named_parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)
    # the weights really are views of the flat parameter: changing it changes them
    fused.flat.data.zero_()
    assert all(not p.any() for p in flat_model.parameters())


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_optimizer_state_moves_between_per_weight_and_flat_layouts(optimizer, tmp_path):
    """An optimizer state saved with one entry per weight (torchrun, or a checkpoint from before the
    flat parameter) resumes on the fused step's flat parameter, and back; the next steps equal those
    of the optimizer that went on uninterrupted."""
    from vaelab.config import RunConfig, TrainConfig
    from vaelab.errors import RunError
    from vaelab.train import _load_optimizer_state, make_optimizer

    config = RunConfig(train=TrainConfig(optimizer=optimizer, lr=1e-2))
    shape = ModelConfig(input_shape=(1, 6, 5), hidden=(16,), latent_dim=2)
    torch.manual_seed(0)
    x = torch.rand(9, 30, dtype=torch.float64)
    eps = torch.randn(9, 2, dtype=torch.float64)
    reference = build_model(shape).double()
    reference_opt = make_optimizer(list(reference.parameters()), config)

    def checkpoint(opt):  # through a file, as a checkpoint is written and read
        torch.save(opt.state_dict(), tmp_path / "state.pt")
        return torch.load(tmp_path / "state.pt", weights_only=True)

    def reference_steps(n):
        for _ in range(n):
            autograd_step(reference, x, x, eps, 1.0, 1 / 9, contextlib.nullcontext)
            reference_opt.step()

    reference_steps(3)
    saved, weights = checkpoint(reference_opt), copy.deepcopy(reference.state_dict())
    reference_steps(2)
    flat_model = build_model(shape).double()
    flat_model.load_state_dict(weights)
    fused = FusedMLPStep(flat_model)
    flat_opt = make_optimizer([fused.flat], config)
    _load_optimizer_state(flat_opt, saved, "run")  # per weight -> flat
    for _ in range(2):
        fused(x, x, eps, 1.0, 1 / 9)
        flat_opt.step()
    for a, b in zip(reference.parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10)

    saved = checkpoint(flat_opt)
    reference_steps(2)
    plain = build_model(shape).double()
    plain.load_state_dict(flat_model.state_dict())
    plain_opt = make_optimizer(list(plain.parameters()), config)
    _load_optimizer_state(plain_opt, saved, "run")  # flat -> per weight
    for _ in range(2):
        autograd_step(plain, x, x, eps, 1.0, 1 / 9, contextlib.nullcontext)
        plain_opt.step()
    for a, b in zip(reference.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10)

    # a state from before the first step is empty in either layout
    empty = make_optimizer(list(build_model(shape).double().parameters()), config).state_dict()
    _load_optimizer_state(flat_opt, empty, "run")
    assert flat_opt.state_dict()["state"] == {}
    # a state for other weights is refused with one line naming the run
    other = build_model(ModelConfig(input_shape=(1, 6, 5), hidden=(8,), latent_dim=2)).double()
    other_opt = make_optimizer(list(other.parameters()), config)
    autograd_step(other, x, x, eps, 1.0, 1 / 9, contextlib.nullcontext)
    other_opt.step()
    with pytest.raises(RunError, match="run: the checkpoint's optimizer state holds"):
        _load_optimizer_state(flat_opt, checkpoint(other_opt), "run")


def test_fused_step_refuses_replaced_views():
    """zero_grad() sets the gradients to None, and .to() / .double() replace the weights: the fused
    step would then write gradients nowhere or update weights the model no longer uses, so it
    refuses to step instead of training silently."""
    model = build_model(ModelConfig(input_shape=(1, 6, 5), hidden=(8,), latent_dim=2))
    fused = FusedMLPStep(model)
    x, eps = torch.rand(4, 30), torch.randn(4, 2)
    fused(x, x, eps, 1.0, 0.25)
    model.zero_grad()
    with pytest.raises(RuntimeError, match="no longer views"):
        fused(x, x, eps, 1.0, 0.25)
    moved = build_model(ModelConfig(input_shape=(1, 6, 5), hidden=(8,), latent_dim=2))
    fused = FusedMLPStep(moved)
    moved.double()  # like .to(): new weight tensors, outside the flat buffer
    with pytest.raises(RuntimeError, match="no longer views"):
        fused(x.double(), x.double(), eps.double(), 1.0, 0.25)
