"""Optimizers: RMSprop exactly as Keras 3 defines it.

Keras 3's RMSprop (keras.optimizers.RMSprop, no momentum, not centered):
    v <- rho * v + (1 - rho) * g^2
    p <- p - lr * g / sqrt(v + eps)

with eps *inside* the root. PyTorch's torch.optim.RMSprop (and Keras 2's) divide by sqrt(v) + eps
instead; with eps = 1e-7 the two differ wherever v is below ~1e-6 (small or rare gradients: the
inside form never divides by less than sqrt(eps) ~ 3.2e-4). The seed's numbers are Keras 3's, so
this is the rule here. It also keeps the vectorised sqrt off its slow path for exact zeros
(measured ~16x slower on these CPUs), since v + eps is never zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import optimizer as _torch_optimizer

from vaelab import native


def flatten_parameters(model: nn.Module) -> nn.Parameter:
    """Put all of a model's parameters, and their gradients, into one contiguous buffer each.

    Every parameter becomes a view into the returned flat parameter, and its `.grad` a view into
    the flat parameter's `.grad`. An optimizer given the flat parameter alone then updates all
    weights with one operation per pass instead of one per tensor: on a CPU, PyTorch's foreach
    operations loop over the tensors one by one, and for the seed's ten small tensors that loop
    costs more than the arithmetic. Whoever computes gradients must write them into the existing
    `.grad` views (`out=`, or in place), never replace them.
    """
    params = list(model.parameters())
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat.data[offset : offset + n].view_as(p)
        p.grad = flat.grad[offset : offset + n].view_as(p)
        offset += n
    return flat


def _rmsprop_update(params, grads, squares, lr: float, alpha: float, eps: float) -> None:
    """One Keras 3 RMSprop update of `params` in place (foreach kernels, one pass each)."""
    torch._foreach_mul_(squares, alpha)
    torch._foreach_addcmul_(squares, grads, grads, value=1 - alpha)
    denominators = torch._foreach_add(squares, eps)
    torch._foreach_sqrt_(denominators)
    torch._foreach_addcdiv_(params, grads, denominators, value=-lr)


# A step count at which Adam's bias corrections, 1 - beta ** step, are exactly 1 (see below)
_NO_BIAS_STEP = 1e9
_NO_BIAS_CORRECTION = torch.tensor(_NO_BIAS_STEP, dtype=torch.float32, device="cpu")


def _rmsprop_update_fused(params, grads, squares, lr: float, alpha: float, eps: float) -> None:
    """The same update with PyTorch's fused Adam kernel: one pass instead of five (CPU only).

    Keras 3's RMSprop is Adam without its first moment (beta1 = 0: the gradient itself), without
    bias correction, and with eps under the root. The kernel computes, in one loop,
        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2;
        p <- p - lr / bc1 * m / (sqrt(v / bc2) + eps'),  bc_i = 1 - beta_i ** step,
    so it is given: beta1 = 0 and the gradient as its own first moment (m = g, written back
    unchanged where finite; an infinite gradient comes back as NaN, after the weights got what
    the five passes give them); a step count at which bc1 = bc2 = 1 exactly; eps' = 0; and eps
    moved under the root by shifting v: with v + eps / alpha going in, the kernel's new v is
    alpha v + eps + (1 - alpha) g^2, the new v plus eps, and subtracting eps afterwards leaves
    the new v in the state, as the five-pass form does. Equal to it to 1e-15 in float64 (tested).
    In float32 a v that should be 0 can come out as -1e-13 or so (the shift's rounding); v only
    ever enters as sqrt(v + eps), so that is harmless. The kernel walks raw memory, so every
    tensor must be contiguous (`_fits_fused_kernel` checks).
    The optimizer's passes over its 1.6 MB buffers push the weights out of the caches between
    steps; a seed epoch at batch 100 took 17 % less time this way (3.39 s against 4.07 s).
    """
    torch._foreach_add_(squares, eps / alpha)
    steps = [_NO_BIAS_CORRECTION] * len(params)
    torch._fused_adam_(
        params, grads, grads, squares, [], steps, amsgrad=False, lr=lr, beta1=0.0, beta2=alpha,
        weight_decay=0.0, eps=0.0, maximize=False,
    )
    torch._foreach_add_(squares, -eps)


def _rmsprop_update_native(params, grads, squares, lr: float, alpha: float, eps: float) -> None:
    """The same update as one pass of step.c's `rmsprop` over each tensor (float32 on a CPU;
    vaelab.native). It computes Keras' formula as written, not the fused Adam kernel's shifted
    form (the compiler may fuse a multiply and an add, so its last bits are its own); on one
    thread it took the seed's 404k weights through an update in about 0.6 of the time the fused
    kernel took with two. Larger models keep the fused kernel, which uses every thread."""
    lib = native.library()
    for p, g, v in zip(params, grads, squares, strict=True):
        lib.rmsprop(p.data_ptr(), g.data_ptr(), v.data_ptr(), p.numel(), lr, alpha, 1.0 - alpha, eps)


NATIVE_MAX_WEIGHTS = 2**20  # the most weights the single-threaded native update takes (measured at 404k)


def _fits_native(params, grads, squares) -> bool:
    """Whether `_rmsprop_update_native` takes these: contiguous float32 CPU tensors of at most
    NATIVE_MAX_WEIGHTS elements in all, and the native library built and checked."""
    return sum(p.numel() for p in params) <= NATIVE_MAX_WEIGHTS and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
        for t in (*params, *grads, *squares)
    ) and native.library() is not None


def _fits_fused_kernel(params, grads, squares, alpha: float) -> bool:
    """Whether `_rmsprop_update_fused` gives the five-pass update: contiguous CPU tensors of one
    floating dtype, and an alpha it can divide by whose power at the kernel's step count is 0,
    so the bias correction is exactly 1 (every alpha up to about 1 - 4e-8; the config allows any
    in (0, 1)). On CUDA the foreach form stays: the fused form has not been measured there."""
    first = params[0]
    return (
        hasattr(torch, "_fused_adam_")  # private: present in the pinned torch, maybe not later
        and 0 < alpha < 1
        and 1.0 - alpha**_NO_BIAS_STEP == 1.0
        and first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.float64)
        and all(
            t.device == first.device and t.dtype == first.dtype and t.is_contiguous()
            for t in (*params, *grads, *squares)
        )
    )


def _rmsprop_update_for_compile(params, grads, squares, lr: float, alpha: float, eps: float) -> None:
    """The same update, tensor by tensor, for torch.compile, which makes it one pass over each
    tensor. Every number enters the arithmetic, never a `value=` argument: a compiled graph would
    keep a `value=` from its first dynamic compile, and the next rate of a schedule (or another
    optimizer's alpha; the compiled code is shared) would be stale (pytorch#197889)."""
    for p, g, v in zip(params, grads, squares, strict=True):
        v.mul_(alpha).add_(g * g * (1 - alpha))
        p.sub_(g / (v + eps).sqrt() * lr)


class RMSprop(torch.optim.Optimizer):
    """Keras 3's RMSprop over all parameters at once (on a CPU one pass: native for float32 models
    up to NATIVE_MAX_WEIGHTS weights, else PyTorch's fused kernel; elsewhere foreach kernels).

    Args:
        params: parameters to optimise.
        lr: learning rate (Keras: 1e-3).
        alpha: decay of the squared-gradient average (Keras' rho: 0.9).
        eps: added to the mean square under the root (Keras: 1e-7).
        compile: run the update through torch.compile (its five passes become one loop). The
            rate is an argument of the compiled update, so a schedule does not recompile it.
    """

    def __init__(
        self, params, lr: float = 1e-3, alpha: float = 0.9, eps: float = 1e-7, compile: bool = False
    ):
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps})
        self._set_update(compile)

    def _set_update(self, compile: bool) -> None:
        self._compile = compile
        self._update = torch.compile(_rmsprop_update_for_compile) if compile else _rmsprop_update

    # copy.deepcopy and pickle keep the choice (Optimizer's own state keeps only defaults, state
    # and param_groups)
    def __getstate__(self):
        return {**super().__getstate__(), "compile": self._compile}

    def __setstate__(self, state):
        compile = state.pop("compile", False)
        super().__setstate__(state)
        self._set_update(compile)

    def step(self, closure=None):
        """One update of every parameter with a gradient. Torch's Optimizer wraps `step` in a
        profiler range and a look for step hooks, together about as long as the Python of the
        update itself (10 us a seed step, hot); here the update is called as it is unless there
        are hooks (this optimizer's or global ones) or a profiler is recording, and wrapped as
        torch wraps it when there are."""
        if self._plain_step():
            return self._update_all()
        return self._hooked_update_all(closure)

    step.hooked = True  # (so Optimizer.__init__ leaves `step` as it is: it wraps itself above)

    def _plain_step(self) -> bool:
        """Whether nothing would see the wrapper: no step hooks and no profiler (where torch keeps
        them elsewhere than this torch does, the wrapper always runs)."""
        pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
        post = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
        return (
            pre == {}
            and post == {}
            and not self._optimizer_step_pre_hooks
            and not self._optimizer_step_post_hooks
            and getattr(torch.autograd.profiler, "_is_profiler_enabled", True) is False
        )

    @torch.no_grad()
    def _update_all(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            squares = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                squares.append(state["square_avg"])
            update = self._update
            if update is _rmsprop_update and _fits_native(params, grads, squares):
                update = _rmsprop_update_native
            elif update is _rmsprop_update and _fits_fused_kernel(params, grads, squares, group["alpha"]):
                update = _rmsprop_update_fused
            update(params, grads, squares, group["lr"], group["alpha"], group["eps"])
        return None

    _hooked_update_all = torch.optim.Optimizer.profile_hook_step(_update_all)


def make_optimizer(params: list[torch.nn.Parameter], config) -> torch.optim.Optimizer:
    """The run's optimizer over `params`: Keras 3's RMSprop (lr 1e-3, rho 0.9, epsilon 1e-7 in
    the seed) or Adam (fused into one kernel on CPUs and GPUs); `config` is a RunConfig."""
    t = config.train
    if t.optimizer == "rmsprop":
        return RMSprop(params, lr=t.lr, alpha=t.rmsprop_alpha, eps=t.eps, compile=t.compile)
    fused = params[0].device.type in ("cpu", "cuda")  # one kernel for all weights
    return torch.optim.Adam(params, lr=t.lr, eps=t.eps, fused=fused)
