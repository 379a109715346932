"""Matrix products of the fused training step on a CPU: through oneDNN where torch has it.

PyTorch's CPU builds send float32 `mm`/`addmm` to MKL, which on CPUs that are not Intel's takes
its AVX2 path: on this project's AMD EPYC (AVX-512) the seed's products ran at 175-200 GFLOP/s
through MKL and 320-440 through oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel
torch.compile's CPU backend calls), both exact float32. The large products go through oneDNN; the
small ones (the latent heads, a few thousand multiply-adds) stay with MKL, whose call costs less.
(The native MLP step computes its own where step.c has tiles, with AVX-512 or AVX2 and FMA:
vaelab/native/mlp.py.)
Both give results that do not depend on the number of threads (tested), and the choice is made
once per process from what torch offers, never from a timing, so a run is reproducible.
"""

from __future__ import annotations

import contextlib
import functools

import torch

ONEDNN_MIN_MACS = 2**20  # multiply-adds of a product from which oneDNN's call pays on a CPU


@functools.cache
def onednn_available() -> bool:
    """Whether this torch can run float32 products through oneDNN on the CPU."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:  # one tiny product, checked against MKL's
        a, w = torch.arange(6.0).reshape(2, 3), torch.arange(12.0).reshape(4, 3)
        return bool(torch.equal(op(a, w, None, "none", [], ""), a @ w.t()))
    except RuntimeError:
        return False


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, allowed: bool = True) -> bool:
    """Whether `linear(x, weight)` goes through oneDNN: a large float32 product on the CPU."""
    return (
        allowed
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.shape[0] * x.shape[1] * weight.shape[0] >= ONEDNN_MIN_MACS
        and onednn_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = True):
    """x @ weight.T (+ bias): (B, in) x (out, in) -> (B, out). Inputs may be transposed views (no
    copy is made of them). `onednn=False`: MKL's always (torch.compile traces only those)."""
    if uses_onednn(x, weight, onednn):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())


def linear_into(
    out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, onednn: bool = True
) -> torch.Tensor:
    """out = x @ weight.T, written into `out` (a gradient's view into its flat buffer)."""
    if uses_onednn(x, weight, onednn):
        return out.copy_(torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""))
    return torch.mm(x, weight.t(), out=out)


_plain = False  # set by `plain_products()`: PyTorch's own products only


@contextlib.contextmanager
def plain_products():
    """PyTorch's own products inside (ONNX export traces the model, and oneDNN's op is not in ONNX)."""
    global _plain
    before, _plain = _plain, True
    try:
        yield
    finally:
        _plain = before


def _tracing() -> bool:
    """Whether the model is being traced (compiled, exported, scripted) rather than run."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return (
        _plain
        or torch.compiler.is_compiling()
        or exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


class _OneDNNLinear(torch.autograd.Function):
    """x W' + b with oneDNN's products forward and backward (dx = dy W, dW = dy' x, db = sum dy)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = linear(dy, weight.t()) if ctx.needs_input_grad[0] else None
        dw = linear(dy.t(), x.t()) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a model's dense layer, through oneDNN (with autograd) where
    that is faster: a large float32 product of a 2-D input on the CPU, outside autocast, tracing,
    compiling and ONNX export, which keep PyTorch's own linear."""
    if (  # (tracing first: a traced batch size must not be compared with anything)
        not _tracing()
        and x.dim() == 2
        and not torch.is_autocast_enabled("cpu")
        and uses_onednn(x, weight)
    ):
        trainable = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and trainable:
            return _OneDNNLinear.apply(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)
