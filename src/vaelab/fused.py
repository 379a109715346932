"""The fused MLP step: the forward and backward pass of the MLP VAE with a Bernoulli likelihood,
derived by hand (`FusedMLPStep`; `vaelab.steps.make_step` chooses it, and re-exports it).

It computes the gradients `vaelab.steps.autograd_step` computes, for the MLP encoder/decoder with
a Bernoulli likelihood. On a CPU and a batch of 100, the time of a step is mostly per-operation
overhead rather than arithmetic; the hand-derived pass needs about half the operations of
autograd (no graph, no saved-tensor bookkeeping, matrix products written straight into
preallocated gradients). `vaelab.native.mlp.NativeMLPStep` runs the work between its products
as native code. tests/test_steps.py checks it against autograd on random models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.models import VAE
from vaelab.models.vae import clip_logit
from vaelab.optim import flatten_parameters
from vaelab.products import linear, linear_into


def _activate_(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return h.clamp_min_(0)
    if activation == "tanh":
        return h.tanh_()
    return F.elu_(h)


def _activation_grad_(dh: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """dh * act'(a), written with the activation's output h = act(a) (in place on dh, except ReLU)."""
    if activation == "relu":  # ReLU's own backward: one pass, no boolean mask to convert
        return torch.ops.aten.threshold_backward(dh, h, 0)
    if activation == "tanh":
        return dh.mul_(1 - h * h)
    return dh.mul_(torch.where(h > 0, 1.0, h + 1))  # elu (alpha 1): exp(a) = h + 1 for a < 0


def _linears(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


class FusedMLPStep:
    """The hand-derived forward and backward pass of the MLP VAE (Bernoulli likelihood).

    Forward, for the seed (784-256-2):
        h1 = relu(x W1' + b1); mean = h1 Wm' + bm; log_var = h1 Wv' + bv
        z = mean + exp(log_var / 2) * epsilon_std * eps
        h2 = relu(z W3' + b3); logits = h2 W4' + b4
    Backward of L = scale * sum(softplus(logits) - target * logits + beta * KL):
        dlogits = scale * (sigmoid(logits) - target); the rest by the chain rule, with the KL's
        closed-form derivatives scale * beta * mean and scale * beta * (exp(log_var) - 1) / 2.
    """

    def __init__(self, model: VAE, compile: bool = False):
        self.model = model
        self.activation = model.config.activation
        self.epsilon_std = model.config.epsilon_std
        clip = model.config.bernoulli_clip
        self.bound = clip_logit(clip) if clip else None  # Keras' probability clipping, in logits
        self.encoder = _linears(model.encoder.body)
        self.decoder = _linears(model.decoder.body)
        # One buffer for all weights and one for all gradients (written by `out=`): the optimizer
        # updates `self.flat`, one tensor, instead of each weight (see `flatten_parameters`).
        self.flat = flatten_parameters(model)
        self.params = list(model.parameters())
        # torch.compile fuses the elementwise work between the matrix products into a few loops;
        # beta and scale stay arguments, so a changing KL weight does not recompile
        self.compiled = compile
        self._pass = torch.compile(self._forward_backward) if compile else self._forward_backward

    def _check_views(self) -> None:
        """Refuse to step once something replaced the views into the flat buffers (`zero_grad()`
        sets gradients to None, `.to()` replaces weights): the step would write gradients nowhere
        and the optimizer would update weights the model no longer uses."""
        # both replace every parameter at once, so the first one tells
        p, grads = self.params[0], self.flat.grad
        if (
            grads is None
            or p.grad is None
            or p.untyped_storage().data_ptr() != self.flat.untyped_storage().data_ptr()
            or p.grad.untyped_storage().data_ptr() != grads.untyped_storage().data_ptr()
        ):
            raise RuntimeError(
                "FusedMLPStep: the model's weights or gradients are no longer views into its flat "
                "buffers (zero_grad() or .to() after the step was made?); make a new step"
            )

    @staticmethod
    def supports(model: VAE, precision: str) -> bool:
        c = model.config
        return (
            not c.deep
            and c.architecture == "mlp"
            and c.likelihood == "bernoulli"
            and not c.conditional
            and precision == "fp32"
        )

    def __call__(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        eps: torch.Tensor,
        beta: float,
        scale: float,
        autocast=None,
        label=None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_views()
        return self._pass(x, target, eps, beta, scale)

    @torch.no_grad()
    def _forward_backward(
        self, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, beta: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        act, enc, dec = self.activation, self.model.encoder, self.model.decoder
        onednn = not self.compiled  # (torch.compile traces MKL's products, not oneDNN's)

        def forward(h, lin):  # act(h W' + b); not oneDNN's fused ReLU, which turns a NaN into 0
            return _activate_(linear(h, lin.weight, lin.bias, onednn=onednn), act)

        # forward: keep every layer's output for the backward pass
        hs = [x]  # (B, D), then (B, hidden_i)
        for lin in self.encoder:
            hs.append(forward(hs[-1], lin))
        mean = torch.addmm(enc.z_mean.bias, hs[-1], enc.z_mean.weight.t())  # (B, K)
        log_var = torch.addmm(enc.z_log_var.bias, hs[-1], enc.z_log_var.weight.t())
        std = torch.exp(0.5 * log_var)
        noise = eps * self.epsilon_std if self.epsilon_std != 1.0 else eps
        z = torch.addcmul(mean, std, noise)  # (B, K)
        gs = [z]
        for lin in self.decoder:
            gs.append(forward(gs[-1], lin))
        logits = linear(gs[-1], dec.out.weight, dec.out.bias, onednn=onednn)  # (B, D)

        unclipped, bound = None, self.bound
        if bound is not None:  # clipped probabilities: clamp, and no gradient beyond
            if self.compiled:  # a tensor: a float bound can go stale in a compiled graph (see below)
                bound = logits.new_ones(()) * bound
            unclipped, logits = logits, logits.clamp(-bound, bound)
        # the batch's sums, image by image first (so that no sum depends on how many threads share
        # it: a run's numbers are then the same at any thread count); softplus(l) - t*l is the
        # Bernoulli negative log-likelihood, as `objectives.bernoulli_log_px` computes it
        recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).sum()
        var = std * std
        kl = -0.5 * (1 + log_var - mean * mean - var).sum(1).sum()

        # backward through the decoder
        dl = torch.sigmoid(logits).sub_(target).mul_(scale)  # (B, D)
        if unclipped is not None:  # clamp's own backward: dl where -bound < l < bound, else 0
            if self.compiled:
                dl = torch.where((unclipped > -bound) & (unclipped < bound), dl, 0.0)
            else:
                dl = torch.ops.aten.hardtanh_backward(dl, unclipped, -bound, bound)
        linear_into(dec.out.weight.grad, dl.t(), gs[-1].t(), onednn)  # dl' g
        torch.sum(dl, 0, out=dec.out.bias.grad)
        dh = linear(dl, dec.out.weight.t(), onednn=onednn)  # dl W
        for i in reversed(range(len(self.decoder))):
            lin = self.decoder[i]
            da = _activation_grad_(dh, gs[i + 1], act)
            linear_into(lin.weight.grad, da.t(), gs[i].t(), onednn)
            torch.sum(da, 0, out=lin.bias.grad)
            dh = linear(da, lin.weight.t(), onednn=onednn)
        dz = dh  # (B, K)

        # through the reparameterization and the closed-form KL
        # the KL weights as 0-d tensors, not `alpha=` numbers: a compiled graph keeps an `alpha=` (or a
        # clamp bound) from its first dynamic compile, stale for the next value (pytorch#197889);
        # addcmul rounds like add(alpha=) did
        kl_scale = mean.new_ones(()) * (scale * beta)  # (torch.tensor(number) would be fixed too)
        dmean = torch.addcmul(dz, mean, kl_scale)
        dlog_var = torch.addcmul((dz * noise * std).mul_(0.5), var.sub(1), kl_scale * 0.5)
        torch.mm(dmean.t(), hs[-1], out=enc.z_mean.weight.grad)
        torch.sum(dmean, 0, out=enc.z_mean.bias.grad)
        torch.mm(dlog_var.t(), hs[-1], out=enc.z_log_var.weight.grad)
        torch.sum(dlog_var, 0, out=enc.z_log_var.bias.grad)
        dh = torch.mm(dmean, enc.z_mean.weight).addmm_(dlog_var, enc.z_log_var.weight)

        # back through the encoder (no gradient for the input itself)
        for i in reversed(range(len(self.encoder))):
            lin = self.encoder[i]
            da = _activation_grad_(dh, hs[i + 1], act)
            linear_into(lin.weight.grad, da.t(), hs[i].t(), onednn)
            torch.sum(da, 0, out=lin.bias.grad)
            if i > 0:
                dh = linear(da, lin.weight.t(), onednn=onednn)
        return recon + beta * kl, recon, kl
